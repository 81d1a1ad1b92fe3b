"""The `scep-fast` command: init, serve, enroll, certs.

Every option has an environment twin: ``--ca-key`` is also
``SCEP_FAST_CA_KEY``; the command line wins over the environment.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from scep_fast import __version__
from scep_fast.runtime import config as configuration
from scep_fast.runtime.config import CONFIG_NAME, Config, ConfigError
from scep_fast.runtime.keys import KeyLoadError
from scep_fast.service.challenges import new_secret
from scep_fast.service.ledger import LedgerError

if TYPE_CHECKING:
    from scep_fast.crypto import NativeKey

DEFAULT_DIR = "scep-data"


def _env(option: str) -> str:
    return "SCEP_FAST_" + option.lstrip("-").replace("-", "_").upper()


class _Parser:
    """argparse with environment defaults for every option."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser

    def option(self, name: str, **kwargs: Any) -> None:
        env = os.environ.get(_env(name))
        if env is not None:
            if kwargs.get("action") == "store_true":
                kwargs["default"] = env.lower() in ("1", "true", "yes", "on")
            else:
                kwargs["default"] = kwargs.get("type", str)(env)
        kwargs["help"] = f"{kwargs.get('help', '')} [env {_env(name)}]".strip()
        self.parser.add_argument(name, **kwargs)


def _with_dir(parser: argparse.ArgumentParser) -> _Parser:
    p = _Parser(parser)
    p.option("--dir", type=Path, default=Path(DEFAULT_DIR),
             help=f"the scep-fast directory (default ./{DEFAULT_DIR})")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scep-fast", description="A fast SCEP server.")
    parser.add_argument("--version", action="version", version=f"scep-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    init = _with_dir(sub.add_parser("init", help="create a CA, an RA and the configuration"))
    from scep_fast.runtime.pki import CA_KEY_TYPES

    init.option("--ca-key", choices=CA_KEY_TYPES, default="rsa2048", help="CA key type")
    init.option("--ca-cn", default="scep-fast CA", help="CA common name")
    init.option("--ra-cn", default="scep-fast RA", help="RA common name")
    init.option("--ca-mode", action="store_true",
                help="no RA: the (RSA) CA certificate signs replies and decrypts requests")
    init.option("--ra-pair", action="store_true",
                help="an NDES-style RA pair: a signing RA (digitalSignature only) and an "
                     "encryption RA (keyEncipherment only, key file ra-encryption.key), "
                     "both served by GetCACert")
    init.option("--ra-encryption-cn", default="scep-fast RA encryption",
                help="common name of the encryption RA (with --ra-pair)")
    init.option("--challenge", default=None,
                help="the static challenge password (default: generated and printed once)")
    init.option("--bind", default=None, help="HOST:PORT written to the config")
    init.option("--ledger-url", default="",
                help="a postgresql:// URL (no password in it): the ledger is that database, "
                     "whose schema init creates (default: LMDB in DIR/ledger)")
    init.option("--ledger-password-file", default="",
                help="the file (relative to DIR) holding the database password")
    init.option("--ca-key-uri", default=None,
                help="the CA key is in a PKCS#11 token: its RFC 7512 URI "
                     "(pkcs11:token=...;object=...)")
    init.option("--ra-key-uri", default=None, help="the RA key is in a PKCS#11 token: its URI")
    init.option("--pkcs11-module", default=None,
                help="the PKCS#11 module (shared library) of the token, an absolute path")
    init.option("--pkcs11-pin-file", default=None,
                help="file holding the token's user PIN, mode 0600 (relative to --dir or "
                     "absolute)")
    init.option("--generate-in-token", action="store_true",
                help="generate the key pairs named by --ca-key-uri and --ra-key-uri inside "
                     "the token (the CA one of type --ca-key, the RA one RSA-2048)")

    serve = _with_dir(sub.add_parser("serve", help="run the SCEP server"))
    serve.option("--bind", default=None, help="HOST:PORT (default from the config)")
    serve.option("--workers", type=int, default=None, help="worker processes (0: CPU count)")
    serve.option("--metrics-bind", default="127.0.0.1:9813",
                 help='HOST:PORT of the Prometheus endpoint ("" for none)')
    serve.option("--admin-bind", default=None,
                 help='HOST:PORT of the admin API ("" for none; default from the config)')
    serve.option("--log-level", default="INFO", help="DEBUG, INFO, WARNING")

    from scep_fast.runtime import cli_client

    cli_client.add_parsers(sub, _Parser)

    challenge = sub.add_parser("challenge", help="one-time challenge passwords")
    challenge_sub = challenge.add_subparsers(dest="challenge_command", required=True)
    challenge_new = _with_dir(challenge_sub.add_parser(
        "new", help="mint a challenge (printed alone on the last line)"))
    challenge_new.option("--ttl", type=int, default=3600, help="seconds until it expires")
    challenge_new.option("--uses", type=int, default=1, help="how many enrollments it allows")
    challenge_new.option("--profile", default="default", help="the profile it grants")
    challenge_new.option("--subject-pattern", default="",
                         help="a regular expression the whole subject must match, "
                              "e.g. 'CN=kiosk-[0-9]+'")
    challenge_new.option("--san-pattern", default="",
                         help="a regular expression every SAN value must match")
    challenge_new.option("--label", default="", help="a note for operators")
    challenge_new.option("--json", action="store_true", help="print one JSON object")

    requests = sub.add_parser("requests", help="requests waiting for approval")
    requests_sub = requests.add_subparsers(dest="requests_command", required=True)
    requests_list = _with_dir(requests_sub.add_parser("list", help="every pending request"))
    requests_list.option("--json", action="store_true", help="one JSON object per line")
    requests_approve = _with_dir(requests_sub.add_parser(
        "approve", help="issue the certificate; the device gets it at its next poll"))
    requests_approve.parser.add_argument("request_id")
    requests_approve.option("--json", action="store_true",
                            help="print the issued certificate's record as JSON")
    requests_reject = _with_dir(requests_sub.add_parser("reject", help="refuse the request"))
    requests_reject.parser.add_argument("request_id")
    requests_reject.option("--reason", default="", help="sent to the device as failInfoText")

    certs = sub.add_parser("certs", help="the issuance ledger")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True)
    certs_list = _with_dir(certs_sub.add_parser("list", help="every issued certificate"))
    certs_list.option("--json", action="store_true", help="one JSON object per line")
    certs_show = _with_dir(certs_sub.add_parser("show", help="one certificate, as PEM"))
    certs_show.parser.add_argument("serial", help="the serial number in hex")
    certs_revoke = _with_dir(certs_sub.add_parser(
        "revoke", help="revoke a certificate and write fresh CRLs"))
    certs_revoke.parser.add_argument("serial", help="the serial number in hex")
    certs_revoke.option("--reason", default="unspecified",
                        help="an RFC 5280 reason: unspecified, keyCompromise, caCompromise, "
                             "affiliationChanged, superseded, cessationOfOperation, "
                             "certificateHold, privilegeWithdrawn, aACompromise")

    _with_dir(sub.add_parser("crl", help="write fresh CRLs of every CA and print their paths"))

    ca = sub.add_parser("ca", help="CA rollover")
    ca_sub = ca.add_subparsers(dest="ca_command", required=True)
    ca_rollover = _with_dir(ca_sub.add_parser(
        "rollover", help="make the next CA (and RA), offered by GetNextCACert"))
    ca_rollover.option("--ca-key", choices=CA_KEY_TYPES, default="rsa2048",
                       help="next CA key type")
    ca_rollover.option("--ca-key-uri", default=None,
                       help="the next CA key is in the token (pki.pkcs11_module): its URI")
    ca_rollover.option("--ra-key-uri", default=None,
                       help="the next RA key is in the token: its URI")
    ca_rollover.option("--generate-in-token", action="store_true",
                       help="generate the next key pairs named by the URIs inside the token")
    ca_rollover.option("--ca-cn", default=None,
                       help='next CA common name (default: the current one + " G2", " G3"...)')
    _with_dir(ca_sub.add_parser("activate", help="switch over to the next CA"))

    ledger = sub.add_parser("ledger", help="the ledger's storage")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    _with_dir(ledger_sub.add_parser(
        "migrate", help="create or check the schema of the configured ledger"))
    ledger_copy = _with_dir(ledger_sub.add_parser(
        "copy", help="copy the configured ledger into an empty one and check the copy "
                     "(stop the servers first)"))
    ledger_copy.option("--to", required=True,
                       help="a postgresql:// URL (the schema is created if missing), "
                            "or a directory for an LMDB ledger")
    ledger_copy.option("--to-password-file", type=Path, default=None,
                       help="the file holding the target database's password")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            return cmd_init(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command in ("enroll", "poll", "renew", "getcert", "getcrl"):
            from scep_fast.runtime import cli_client

            return cli_client.run(args)
        if args.command == "challenge":
            return cmd_challenge(args)
        if args.command == "requests":
            return cmd_requests(args)
        if args.command == "certs":
            return cmd_certs(args)
        if args.command == "crl":
            return cmd_crl(args)
        if args.command == "ca":
            return cmd_ca(args)
        if args.command == "ledger":
            return cmd_ledger(args)
    except ConfigError as e:
        print(f"scep-fast: configuration error: {e}", file=sys.stderr)
        return 2
    except LedgerError as e:
        # Unreachable, an unknown schema, a corrupt record: the message says which.
        print(f"scep-fast: {e}", file=sys.stderr)
        return 1
    except KeyLoadError as e:
        print(f"scep-fast: cannot use a key: {e}", file=sys.stderr)
        return 2
    return 2


# ---- init -----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from scep_fast.runtime import pki

    directory: Path = args.dir
    if (directory / CONFIG_NAME).exists():
        print(f"scep-fast: {directory / CONFIG_NAME} exists; not overwriting", file=sys.stderr)
        return 1
    if args.ca_mode and not args.ca_key.startswith("rsa"):
        print("scep-fast: CA mode needs an RSA CA key (it decrypts requests)", file=sys.stderr)
        return 2
    if args.ca_mode and args.ra_pair:
        print("scep-fast: --ra-pair is an RA mode option; not with --ca-mode", file=sys.stderr)
        return 2
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    values = configuration.defaults()
    if args.bind:
        values["server"]["bind"] = args.bind
    values["pki"]["mode"] = "ca" if args.ca_mode else "ra"
    values["profiles"]["default"] = configuration.default_profile()
    values["ledger"]["url"] = args.ledger_url
    values["ledger"]["password_file"] = args.ledger_password_file
    if args.ra_pair:
        values["pki"]["ra_encryption_cert"] = "ra-encryption.pem"
        values["pki"]["ra_encryption_key"] = "ra-encryption.key"
    # Checked before anything is written: a URL with a password in it is refused.
    configuration.parse(configuration.render(values), directory)
    now = datetime.datetime.now(datetime.UTC)
    try:
        token_keys = _token_keys(args, directory, values)
    except (KeyLoadError, ValueError) as e:
        print(f"scep-fast: {e}", file=sys.stderr)
        return 1
    ca_key: pki.SigningKey
    if "ca_key" in token_keys:
        ca_key = token_keys["ca_key"]
    else:
        ca_key = pki.new_key(args.ca_key)
        pki.write_secret(directory / values["pki"]["ca_key"], pki.key_pem(ca_key))
    ca = pki.make_ca(ca_key, args.ca_cn, now)
    pki.write_public(directory / values["pki"]["ca_cert"], pki.cert_pem(ca))
    if not args.ca_mode:
        ra_key: pki.SigningKey
        if "ra_key" in token_keys:
            ra_key = token_keys["ra_key"]
        else:
            ra_key = pki.new_rsa_key(2048)
            pki.write_secret(directory / values["pki"]["ra_key"], pki.key_pem(ra_key))
        ra = pki.make_ra(ra_key, args.ra_cn, ca, ca_key, now,
                         usage="signing" if args.ra_pair else "both")
        pki.write_public(directory / values["pki"]["ra_cert"], pki.cert_pem(ra))
    if args.ra_pair:
        # The encryption half of the pair: always a key file, 0600.
        encryption_key = pki.new_rsa_key(2048)
        pki.write_secret(directory / values["pki"]["ra_encryption_key"],
                         pki.key_pem(encryption_key))
        encryption = pki.make_ra(encryption_key, args.ra_encryption_cn, ca, ca_key, now,
                                 usage="encryption")
        pki.write_public(directory / values["pki"]["ra_encryption_cert"],
                         pki.cert_pem(encryption))
    # The bearer token of the admin API (one-time challenges, approvals).
    pki.write_secret(directory / values["admin"]["token_file"],
                     secrets.token_urlsafe(32).encode() + b"\n")
    challenge = args.challenge or new_secret(24)
    pki.write_secret(directory / values["enrollment"]["challenge_file"],
                     challenge.encode() + b"\n")
    # Checked like any config before it is written.
    text = configuration.render(values)
    config = configuration.parse(text, directory)
    if args.ledger_url:
        # The config is written only once its database holds the schema.
        _migrate(config)
    (directory / CONFIG_NAME).write_text(text, encoding="utf-8")
    in_token = " and ".join(name[:2].upper() for name in token_keys)
    kind = "token-held" if "ca_key" in token_keys and not args.generate_in_token else args.ca_key
    mode = ("CA mode" if args.ca_mode else
            "RA mode, NDES-style RA pair" if args.ra_pair else "RA mode")
    print(f"initialised {directory} ({kind} CA, {mode}"
          + (f"; {in_token} key in the token)" if in_token else ")"))
    if args.challenge is None:
        print("challenge password (shown once; also in "
              f"{directory / values['enrollment']['challenge_file']}):")
        print(challenge)
    return 0


def _token_keys(args: argparse.Namespace, directory: Path,
                values: dict[str, dict[str, Any]]) -> dict[str, NativeKey]:
    """The CA and RA keys that live in a token, by config key; generated there if asked.

    Everything about the token is checked before any file is written.
    """
    from cryptography.hazmat.primitives.asymmetric import rsa

    from scep_fast.crypto.x509sign import public_key
    from scep_fast.runtime import keys

    uris = {"ca_key": args.ca_key_uri}
    if not args.ca_mode:
        uris["ra_key"] = args.ra_key_uri
    uris = {name: uri for name, uri in uris.items() if uri}
    if not uris:
        if args.generate_in_token:
            raise ValueError("--generate-in-token needs --ca-key-uri or --ra-key-uri")
        return {}
    if not args.pkcs11_module or not args.pkcs11_pin_file:
        raise ValueError("a key in a token needs --pkcs11-module and --pkcs11-pin-file")
    values["pki"]["pkcs11_module"] = args.pkcs11_module
    values["pki"]["pkcs11_pin_file"] = args.pkcs11_pin_file
    refs = {name: keys.TokenKey(uri=uri, module=args.pkcs11_module,
                                pin_file=directory / args.pkcs11_pin_file)
            for name, uri in uris.items()}
    for name, ref in refs.items():
        keys.check_uri(ref.uri)
        values["pki"][name] = ref.uri
    keys.read_pin(directory / args.pkcs11_pin_file)
    if args.generate_in_token:
        for ref in refs.values():
            if _token_has(ref):
                raise ValueError(f"{ref.uri} exists in the token; not generating another")
        for name, ref in refs.items():
            keys.generate_in_token(ref, args.ca_key if name == "ca_key" else "rsa2048")
    loaded = {name: keys.native_key(ref) for name, ref in refs.items()}
    if (args.ca_mode or "ra_key" in loaded) and not isinstance(
            public_key(loaded.get("ra_key") or loaded["ca_key"]), rsa.RSAPublicKey):
        raise ValueError("the key that decrypts requests (RA, or the CA in CA mode) must be RSA")
    return loaded


def _token_has(ref: Any) -> bool:
    from scep_fast.runtime.keys import KeyLoadError, native_key

    try:
        native_key(ref)
    except KeyLoadError:
        return False
    return True


# ---- serve ------------------------------------------------------------------------


def load_config(directory: Path, overrides: dict[tuple[str, str], Any]) -> Config:
    return configuration.with_overrides(configuration.load(directory), overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    from scep_fast.runtime import logs, supervisor

    config = load_config(args.dir, {("server", "bind"): args.bind,
                                    ("server", "workers"): args.workers,
                                    ("admin", "bind"): args.admin_bind})
    logs.configure(args.log_level.upper())
    return supervisor.run(config, metrics_bind=args.metrics_bind, log_level=args.log_level)


# ---- enroll -------------------------------------------------------------------------


# ---- certs --------------------------------------------------------------------------


def cmd_challenge(args: argparse.Namespace) -> int:
    import time

    from scep_fast.runtime.server import open_ledger
    from scep_fast.service.challenges import ChallengeRequestInvalid, mint_challenge

    config = configuration.load(args.dir)
    with open_ledger(config) as ledger:
        try:
            minted = mint_challenge(ledger, now=time.time(), ttl_seconds=args.ttl,
                                    uses=args.uses, profile=args.profile,
                                    profiles=list(config.values["profiles"]),
                                    subject_pattern=args.subject_pattern,
                                    san_pattern=args.san_pattern, label=args.label)
        except ChallengeRequestInvalid as e:
            print(f"scep-fast: {e}", file=sys.stderr)
            return 2
    c = minted.challenge
    if args.json:
        print(json.dumps({"challenge": minted.secret, "expires_at": c.expires_at,
                          "uses": c.uses_left, "profile": c.profile}))
    else:
        print(f"one-time challenge for profile {c.profile}, {c.uses_left} use(s), "
              f"expires in {args.ttl} s:")
        print(minted.secret)
    return 0


def cmd_requests(args: argparse.Namespace) -> int:
    from scep_fast.protocol import KeysUnavailable
    from scep_fast.runtime.admin import (
        APPROVE_KEYS_UNAVAILABLE,
        APPROVE_LEDGER_FULL,
        APPROVE_NOT_FOUND,
    )
    from scep_fast.runtime.ledger_json import pending_to_json, record_to_json
    from scep_fast.runtime.pki import load_material
    from scep_fast.runtime.server import build_service, open_ledger
    from scep_fast.service.ledger import LedgerError, LedgerFull, NotFound

    config = configuration.load(args.dir)
    with open_ledger(config) as ledger:
        if args.requests_command == "list":
            for pending in ledger.iter_pending():
                item = pending_to_json(pending)
                if args.json:
                    print(json.dumps(item))
                else:
                    print(f"{item['request_id']}  {item['status']:8}  {item['received_at']}  "
                          f"{item['subject']}")
            return 0
        service = build_service(config, load_material(config), ledger)
        try:
            if args.requests_command == "approve":
                record = record_to_json(service.approve(args.request_id))
                if args.json:
                    print(json.dumps(record))
                else:
                    print(f"approved {args.request_id}: serial {record['serial']} "
                          f"for {record['subject']}")
            else:
                service.reject(args.request_id, args.reason)
                print(f"rejected {args.request_id}")
        except LedgerError as e:
            print(f"scep-fast: {e}", file=sys.stderr)
            # Told apart for the admin API, which approves in this command
            # when the keys live in a token (admin.approve_in_child).
            return (APPROVE_NOT_FOUND if isinstance(e, NotFound)
                    else APPROVE_LEDGER_FULL if isinstance(e, LedgerFull) else 1)
        except KeysUnavailable as e:
            print(f"scep-fast: {e.reason}: {e.detail}", file=sys.stderr)
            return APPROVE_KEYS_UNAVAILABLE
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from scep_fast.runtime.ledger_json import record_to_json
    from scep_fast.runtime.server import open_ledger

    config = configuration.load(args.dir)
    with open_ledger(config) as ledger:
        if args.certs_command == "list":
            for record in ledger.iter_records():
                if args.json:
                    print(json.dumps(record_to_json(record)))
                else:
                    item = record_to_json(record)
                    print(f"{item['serial']}  {item['status']:8}  {item['not_after']}  "
                          f"{item['subject']}")
            return 0
        try:
            serial = int(args.serial.replace(":", ""), 16)
        except ValueError:
            print(f"scep-fast: {args.serial!r} is not a hex serial number", file=sys.stderr)
            return 2
        if args.certs_command == "revoke":
            return _revoke(config, ledger, serial, args.reason)
        found = ledger.get(serial)
        if found is None:
            print(f"scep-fast: no certificate with serial {serial:x}", file=sys.stderr)
            return 1
        print(json.dumps(record_to_json(found), indent=2))
        cert = x509.load_der_x509_certificate(found.der)
        sys.stdout.write(cert.public_bytes(serialization.Encoding.PEM).decode())
        return 0


# ---- revocation, CRLs and CA rollover -------------------------------------------------

_RELOAD_HINT = ("running servers keep the old keys until reloaded: "
                "kill -HUP <pid of scep-fast serve>")


def _revoke(config: Config, ledger: Any, serial: int, reason_name: str) -> int:
    from scep_fast.runtime import crl
    from scep_fast.runtime.pki import load_material
    from scep_fast.service.ledger import REVOCATION_REASONS, NotFound

    try:
        reason = crl.reason_code(reason_name)
    except ValueError as e:
        print(f"scep-fast: {e}", file=sys.stderr)
        return 2
    if reason == 8:
        print("scep-fast: removeFromCRL only has a meaning in a delta CRL; "
              "a revocation cannot be undone", file=sys.stderr)
        return 2
    try:
        record, paths = crl.revoke(config, ledger, load_material(config), serial, reason)
    except NotFound:
        print(f"scep-fast: no certificate with serial {serial:x}", file=sys.stderr)
        return 1
    print(f"revoked {record.serial:x} ({REVOCATION_REASONS[record.revocation_reason]})")
    for path in paths:
        print(path)
    return 0


def cmd_crl(args: argparse.Namespace) -> int:
    from scep_fast.runtime.crl import refresh_all
    from scep_fast.runtime.pki import load_material
    from scep_fast.runtime.server import open_ledger

    config = configuration.load(args.dir)
    with open_ledger(config) as ledger:
        for path in refresh_all(config, ledger, load_material(config), force=True):
            print(path)
    return 0


def cmd_ca(args: argparse.Namespace) -> int:
    from scep_fast.runtime import pki
    from scep_fast.runtime.crl import refresh_all
    from scep_fast.runtime.server import open_ledger

    config = configuration.load(args.dir)
    try:
        if args.ca_command == "rollover":
            path = pki.rollover(config, args.ca_key, datetime.datetime.now(datetime.UTC),
                                ca_cn=args.ca_cn, ca_key_uri=args.ca_key_uri,
                                ra_key_uri=args.ra_key_uri,
                                generate_in_token=args.generate_in_token)
            print(f"next CA in {path}; GetNextCACert offers it once servers reload")
            print(_RELOAD_HINT)
            return 0
        old_id, new_id = pki.activate(config)
    except pki.RolloverError as e:
        print(f"scep-fast: {e}", file=sys.stderr)
        return 1
    # Activation may have named other keys in the config.
    config = configuration.load(args.dir)
    # The new CA's CRL exists before any certificate names it.
    with open_ledger(config) as ledger:
        refresh_all(config, ledger, pki.load_material(config))
    print(f"activated CA {new_id}" + (f"; CA {old_id} retired" if old_id else ""))
    print(_RELOAD_HINT)
    return 0

# ---- ledger ---------------------------------------------------------------------------


def _migrate(config: Config) -> None:
    from scep_fast.runtime.ledger_pg import migrate, redacted
    from scep_fast.runtime.server import ledger_password_file

    url = str(config.get("ledger", "url"))
    found, now = migrate(url, password_file=ledger_password_file(config))
    if found is None:
        state = "created"
    elif found != now:
        state = f"upgraded from version {found}"
    else:
        state = "up to date"
    print(f"ledger {redacted(url)}: schema version {now} ({state})")


def _copy(config: Config, to: str, password_file: Path | None) -> int:
    from contextlib import ExitStack

    from scep_fast.runtime.ledger_copy import CopyableLedger, copy_ledger
    from scep_fast.runtime.ledger_lmdb import LmdbLedger
    from scep_fast.runtime.ledger_pg import PgLedger, is_postgres_url, migrate, redacted
    from scep_fast.runtime.server import open_ledger

    with ExitStack() as stack:
        source = open_ledger(config)
        stack.callback(source.close)
        target: CopyableLedger
        if is_postgres_url(to):
            migrate(to, password_file=password_file)
            target = stack.enter_context(PgLedger(to, password_file=password_file))
            where = redacted(to)
        else:
            target = stack.enter_context(LmdbLedger(
                to, map_size_bytes=int(config.get("ledger", "map_size_bytes"))))
            where = to
        copied, _ = copy_ledger(source, target)
    print(f"copied to {where}: {copied.line()}")
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    from scep_fast.runtime.ledger_lmdb import LmdbLedger
    from scep_fast.runtime.server import LEDGER_DIR

    config = configuration.load(args.dir)
    if args.ledger_command == "copy":
        return _copy(config, args.to, args.to_password_file)
    if config.get("ledger", "url"):
        _migrate(config)
        return 0
    # LMDB upgrades its schema in place when it is opened.
    with LmdbLedger(config.dir / LEDGER_DIR,
                    map_size_bytes=int(config.get("ledger", "map_size_bytes"))) as ledger:
        print(f"ledger {ledger.path}: LMDB, {ledger.count()} certificates, schema up to date")
    return 0

if __name__ == "__main__":
    sys.exit(main())
