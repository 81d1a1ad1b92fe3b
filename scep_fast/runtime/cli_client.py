"""The client side of the `scep-fast` command: enroll, poll, renew, getcert, getcrl.

Exit codes: 0 done, 1 refused or failed, 2 bad usage, 3 pending (run
`scep-fast poll` later with the state file the command wrote).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from scep_fast.client import (
    CertRep,
    DeviceKey,
    KeyKind,
    PkiRequest,
    ScepClientError,
    enroll,
    generate_key,
    get_cert,
    get_crl,
    poll,
    renew,
)
from scep_fast.protocol import MessageType, PKIStatus
from scep_fast.runtime.pki import write_secret

KEY_KINDS: dict[str, KeyKind] = {"rsa2048": "rsa2048", "rsa3072": "rsa3072", "rsa4096": "rsa4096",
             "p256": "ec-p256", "p384": "ec-p384"}
EXIT_PENDING = 3
PEM = serialization.Encoding.PEM


def add_parsers(sub: Any, parser_type: Callable[[argparse.ArgumentParser], Any]) -> None:
    enroll_p = parser_type(sub.add_parser("enroll", help="enroll against a SCEP server"))
    enroll_p.parser.add_argument("url", help="the SCEP URL, e.g. http://127.0.0.1:8080/scep")
    enroll_p.option("--challenge", default=None, help="the challenge password")
    enroll_p.option("--cn", default=None, help="the common name")
    enroll_p.option("--dns", action="append", default=[], help="a DNS subjectAltName (repeat)")
    enroll_p.option("--get", action="store_true", help="send the PKIOperation by GET")
    enroll_p.option("--key-type", choices=tuple(KEY_KINDS), default="rsa2048",
                    help="the device key")
    enroll_p.option("--key-out", type=Path, default=None,
                    help="where the device key goes (PEM, 0600)")
    enroll_p.option("--cert-out", type=Path, default=None,
                    help="where the certificate goes (PEM)")
    enroll_p.option("--wait", type=float, default=0.0,
                    help="seconds to keep polling while the CA answers PENDING")
    enroll_p.option("--timeout", type=float, default=30.0, help="seconds per HTTP request")

    poll_p = parser_type(sub.add_parser(
        "poll", help="CertPoll a pending enrollment (state from `enroll`)"))
    poll_p.parser.add_argument("url")
    poll_p.option("--key-in", type=Path, default=None, help="the device key `enroll` wrote")
    poll_p.option("--state", type=Path, default=None,
                  help="the .pending.json file `enroll` wrote")
    poll_p.option("--cert-out", type=Path, default=None, help="where the certificate goes")
    poll_p.option("--wait", type=float, default=0.0, help="seconds to keep polling")
    poll_p.option("--timeout", type=float, default=30.0, help="seconds per HTTP request")

    renew_p = parser_type(sub.add_parser(
        "renew", help="RenewalReq signed with the certificate to renew"))
    renew_p.parser.add_argument("url")
    renew_p.option("--cert-in", type=Path, default=None, help="the certificate to renew")
    renew_p.option("--key-in", type=Path, default=None, help="its key (RSA)")
    renew_p.option("--rekey", action="store_true", help="a new key (written to --key-out)")
    renew_p.option("--key-type", choices=tuple(KEY_KINDS), default="rsa2048",
                   help="the new key's type with --rekey")
    renew_p.option("--key-out", type=Path, default=None, help="the new key with --rekey")
    renew_p.option("--cert-out", type=Path, default=None, help="the new certificate")
    renew_p.option("--get", action="store_true", help="send the PKIOperation by GET")
    renew_p.option("--timeout", type=float, default=30.0, help="seconds per HTTP request")

    getcert_p = parser_type(sub.add_parser("getcert", help="GetCert by serial number"))
    getcert_p.parser.add_argument("url")
    getcert_p.option("--serial", default=None, help="the serial number in hex")
    getcert_p.option("--cert-out", type=Path, default=None, help="default: standard output")
    getcert_p.option("--timeout", type=float, default=30.0, help="seconds per HTTP request")

    getcrl_p = parser_type(sub.add_parser("getcrl", help="GetCRL: the CA's current CRL"))
    getcrl_p.parser.add_argument("url")
    getcrl_p.option("--crl-out", type=Path, default=None, help="default: standard output")
    getcrl_p.option("--timeout", type=float, default=30.0, help="seconds per HTTP request")


def run(args: argparse.Namespace) -> int:
    commands = {"enroll": _enroll, "poll": _poll, "renew": _renew, "getcert": _getcert,
                "getcrl": _getcrl}
    try:
        return commands[args.command](args)
    except _Usage as e:
        print(f"scep-fast {args.command}: {e}", file=sys.stderr)
        return 2
    except (ScepClientError, ValueError, OSError) as e:
        print(f"scep-fast {args.command}: {e}", file=sys.stderr)
        return 1


class _Usage(Exception):
    pass


def _need(args: argparse.Namespace, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise _Usage(f"needs {', '.join(missing)}")


def _fresh(*paths: Path | None) -> None:
    for path in paths:
        if path is not None and path.exists():
            raise _Usage(f"{path} exists; not overwriting")


def _key_pem(key: DeviceKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _refused(command: str, reply_status: PKIStatus, fail_info: Any, text: str | None) -> int:
    detail = f" ({fail_info.name})" if fail_info is not None else ""
    print(f"scep-fast {command}: {reply_status.name}{detail}{': ' + text if text else ''}",
          file=sys.stderr)
    return EXIT_PENDING if reply_status is PKIStatus.PENDING else 1


def _write_cert(path: Path, cert: x509.Certificate, chain: tuple[x509.Certificate, ...]) -> None:
    path.write_bytes(cert.public_bytes(PEM) + b"".join(c.public_bytes(PEM) for c in chain))
    print(f"issued serial {cert.serial_number:x} to {cert.subject.rfc4514_string()}")


def _state_path(cert_out: Path) -> Path:
    return cert_out.with_name(cert_out.name + ".pending.json")


def _enroll(args: argparse.Namespace) -> int:
    _need(args, "challenge", "cn", "key_out", "cert_out")
    _fresh(args.key_out, args.cert_out)
    result = enroll(args.url, args.challenge, args.cn, use_get=args.get,
                    key=generate_key(KEY_KINDS[args.key_type]), sans=tuple(args.dns),
                    timeout=args.timeout)
    reply: CertRep = result.reply
    if reply.status is PKIStatus.PENDING and args.wait > 0:
        reply = poll(args.url, result.request, wait_seconds=args.wait, use_get=args.get,
                     timeout=args.timeout)
    if reply.status is PKIStatus.PENDING:
        # Keep what a later poll needs: the key (which also signed the request)
        # and the request's identity.
        write_secret(args.key_out, _key_pem(result.key))
        _save_state(_state_path(args.cert_out), args.url, result.request)
        print(f"pending; poll with: scep-fast poll {args.url} --key-in {args.key_out} "
              f"--state {_state_path(args.cert_out)} --cert-out {args.cert_out}")
        return EXIT_PENDING
    if reply.status is not PKIStatus.SUCCESS:
        return _refused("enroll", reply.status, reply.fail_info, reply.fail_info_text)
    write_secret(args.key_out, _key_pem(result.key))
    _write_cert(args.cert_out, reply.certificates[0], reply.certificates[1:])
    return 0


def _save_state(path: Path, url: str, request: PkiRequest) -> None:
    state = {"url": url, "transaction_id": request.transaction_id,
             "signer_cert": request.signer_cert.public_bytes(PEM).decode(),
             "recipient": request.recipient.public_bytes(PEM).decode(),
             "csr": x509.load_der_x509_csr(request.csr).public_bytes(PEM).decode()}
    path.write_text(json.dumps(state, indent=2) + "\n")


def _poll(args: argparse.Namespace) -> int:
    _need(args, "key_in", "state", "cert_out")
    _fresh(args.cert_out)
    state = json.loads(args.state.read_text())
    key = serialization.load_pem_private_key(args.key_in.read_bytes(), password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise _Usage("the key that signed the request is RSA")
    csr = x509.load_pem_x509_csr(state["csr"].encode())
    original = PkiRequest(
        message=b"", message_type=MessageType.PKCS_REQ, transaction_id=state["transaction_id"],
        sender_nonce=b"", digest="sha256", cipher="aes128", key_transport="pkcs1v15",
        recipient=x509.load_pem_x509_certificate(state["recipient"].encode()),
        signer_key=key, signer_cert=x509.load_pem_x509_certificate(state["signer_cert"].encode()),
        device_key=key, csr=csr.public_bytes(serialization.Encoding.DER))
    reply = poll(args.url, original, wait_seconds=args.wait, timeout=args.timeout)
    if reply.status is not PKIStatus.SUCCESS:
        return _refused("poll", reply.status, reply.fail_info, reply.fail_info_text)
    _write_cert(args.cert_out, reply.certificates[0], reply.certificates[1:])
    args.state.unlink()
    return 0


def _renew(args: argparse.Namespace) -> int:
    _need(args, "cert_in", "key_in", "cert_out")
    if args.rekey:
        _need(args, "key_out")
    _fresh(args.cert_out, args.key_out if args.rekey else None)
    old_cert = x509.load_pem_x509_certificate(args.cert_in.read_bytes())
    old_key = serialization.load_pem_private_key(args.key_in.read_bytes(), password=None)
    if not isinstance(old_key, rsa.RSAPrivateKey):
        raise _Usage("renewal signs with the old key, which must be RSA")
    new_key = generate_key(KEY_KINDS[args.key_type]) if args.rekey else None
    _, reply = renew(args.url, old_cert, old_key, new_key=new_key, use_get=args.get,
                     timeout=args.timeout)
    if reply.status is not PKIStatus.SUCCESS:
        return _refused("renew", reply.status, reply.fail_info, reply.fail_info_text)
    if new_key is not None:
        write_secret(args.key_out, _key_pem(new_key))
    _write_cert(args.cert_out, reply.certificates[0], reply.certificates[1:])
    return 0


def _getcert(args: argparse.Namespace) -> int:
    _need(args, "serial")
    try:
        serial = int(args.serial.replace(":", ""), 16)
    except ValueError:
        raise _Usage(f"{args.serial!r} is not a hex serial number") from None
    reply = get_cert(args.url, serial, timeout=args.timeout)
    if reply.status is not PKIStatus.SUCCESS:
        return _refused("getcert", reply.status, reply.fail_info, reply.fail_info_text)
    _emit(reply.certificates[0].public_bytes(PEM), args.cert_out)
    return 0


def _getcrl(args: argparse.Namespace) -> int:
    reply = get_crl(args.url, timeout=args.timeout)
    if reply.status is not PKIStatus.SUCCESS or not reply.crls:
        return _refused("getcrl", reply.status, reply.fail_info, reply.fail_info_text)
    _emit(reply.crls[0].public_bytes(PEM), args.crl_out)
    return 0


def _emit(pem: bytes, path: Path | None) -> None:
    """PEM to ``path``, or to standard output without one."""
    if path is None:
        sys.stdout.write(pem.decode())
    else:
        path.write_bytes(pem)
