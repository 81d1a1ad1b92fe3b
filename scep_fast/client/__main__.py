"""``python -m scep_fast.client enroll URL ...``: one enrollment, for scripts and tests.

Writes the device key and the issued certificate as PEM, prints one JSON line
describing the outcome, and exits like certmonger's scep-submit: 0 issued,
1 pending, 2 refused, 3 unreachable or a bad answer.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

from cryptography.hazmat.primitives import serialization

from scep_fast.client.errors import ScepClientError
from scep_fast.client.http import DEFAULT_TIMEOUT_SECONDS, enroll
from scep_fast.client.messages import (
    CipherName,
    DigestName,
    KeyKind,
    KeyTransportName,
    generate_key,
)
from scep_fast.protocol.enums import PKIStatus

EXIT_ISSUED, EXIT_PENDING, EXIT_REFUSED, EXIT_ERROR = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scep_fast.client")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("enroll", help="enroll one device with a PKCSReq")
    p.add_argument("url", help="SCEP endpoint, e.g. http://127.0.0.1:8080/scep")
    p.add_argument("--cn", required=True)
    p.add_argument("--challenge", help="challengePassword for the CSR")
    p.add_argument("--san", action="append", default=[], help="DNS subjectAltName (repeatable)")
    p.add_argument("--get", action="store_true", help="send PKIOperation by GET")
    p.add_argument("--key-type", choices=get_args(KeyKind), default="rsa2048")
    p.add_argument("--digest", choices=get_args(DigestName))
    p.add_argument("--cipher", choices=get_args(CipherName))
    p.add_argument("--key-transport", choices=get_args(KeyTransportName), default="pkcs1v15")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS)
    p.add_argument("--key-out", type=Path, help="write the device key here (PEM, PKCS#8)")
    p.add_argument("--cert-out", type=Path, help="write the issued certificate here (PEM)")
    p.add_argument("--chain-out", type=Path, help="write the other certificates here (PEM)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = enroll(
            args.url,
            args.challenge,
            args.cn,
            use_get=args.get,
            key=generate_key(args.key_type),
            sans=args.san,
            digest=args.digest,
            cipher=args.cipher,
            key_transport=args.key_transport,
            timeout=args.timeout,
        )
    except ScepClientError as exc:
        print(json.dumps({"status": "ERROR", "error": str(exc)}))
        return EXIT_ERROR
    pem = serialization.Encoding.PEM
    if args.key_out is not None:
        args.key_out.write_bytes(
            result.key.private_bytes(
                pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    if result.cert is not None and args.cert_out is not None:
        args.cert_out.write_bytes(result.cert.public_bytes(pem))
    if args.chain_out is not None:
        args.chain_out.write_bytes(b"".join(c.public_bytes(pem) for c in result.chain))
    print(
        json.dumps(
            {
                "status": result.status.name,
                "fail_info": result.fail_info.name if result.fail_info is not None else None,
                "fail_info_text": result.fail_info_text,
                "transaction_id": result.transaction_id,
                "digest": result.reply.digest,
                "cipher": result.reply.cipher,
                "subject": result.cert.subject.rfc4514_string() if result.cert else None,
                "serial": result.cert.serial_number if result.cert else None,
            }
        )
    )
    return {
        PKIStatus.SUCCESS: EXIT_ISSUED,
        PKIStatus.PENDING: EXIT_PENDING,
        PKIStatus.FAILURE: EXIT_REFUSED,
    }[result.status]


if __name__ == "__main__":
    sys.exit(main())
