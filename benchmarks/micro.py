"""CPU cost of the native core per PKCSReq, beside OpenSSL's own RSA-2048 speed.

    python benchmarks/micro.py [--seconds S] [--batch N]

Builds RSA-2048 PKCSReqs with an independent builder (tests/vectors/make_ber_vector.py),
then measures the process CPU time of unwrap, issue and wrap per request, in
batches as the server runs them, with an RSA-2048 CA and with an ECDSA P-256
CA. In the same run it times `openssl speed rsa2048`. The floor is three
RSA-2048 private-key operations per enrollment (decrypt the envelope, sign the
certificate, sign the CertRep); `ratio` compares the core with that floor.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from scep_fast.crypto import (
    CertRepSpec,
    IssueRequest,
    ScepContext,
    der_certificate,
    der_private_key,
)

ROOT = Path(__file__).resolve().parents[1]
VECTORS = ROOT / "tests" / "vectors"


def load_keypair(name: str) -> tuple[bytes, bytes]:
    return (der_certificate((VECTORS / f"{name}.pem").read_bytes()),
            der_private_key((VECTORS / f"{name}.key").read_bytes()))


def p256_ca() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "micro-benchmark P-256 CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.DER),
            key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def build_requests(count: int) -> list[bytes]:
    spec = importlib.util.spec_from_file_location("make_ber_vector", VECTORS / "make_ber_vector.py")
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        key = Path(tmp) / "device.key"
        for i in range(count):
            path = Path(tmp) / f"req{i}.der"
            builder.make_pkcsreq(argparse.Namespace(
                device_key=str(key), new_key=False, key_size=2048, ra_cert=str(VECTORS / "ra.pem"),
                nonce=None, nonce_len=16, cn=f"micro-{i}", signer_cn=None,
                challenge="secret-challenge", cipher="aes128", key_transport="pkcs1v15",
                rid="issuer-serial", envelope="der", chunk=1000, digest="sha256",
                sig_alg="rsaEncryption", outer="der", signer_id="issuer-serial",
                out=str(path)))
            out.append(path.read_bytes())
    return out


def cpu_per_item(fn: Callable[[], int], seconds: float) -> float:
    """Process CPU microseconds per item, over repeated calls for about `seconds`."""
    fn()  # warm-up
    items = 0
    start_cpu, start_wall = time.process_time(), time.monotonic()
    while time.monotonic() - start_wall < seconds:
        items += fn()
    return (time.process_time() - start_cpu) / items * 1e6


def openssl_rsa2048_sign_us(seconds: int) -> float:
    out = subprocess.run(["openssl", "speed", "-seconds", str(seconds), "rsa2048"],
                         capture_output=True, text=True, check=True).stdout
    match = re.search(r"^rsa\s+2048 bits\s+\S+\s+\S+\s+([\d.]+)\s+([\d.]+)", out, re.M)
    if match is None:
        raise RuntimeError(f"cannot read openssl speed output:\n{out}")
    return 1e6 / float(match.group(1))


def measure(ctx: ScepContext, requests: list[bytes], batch: int, seconds: float,
            ca_cert: bytes) -> dict[str, float]:
    msgs = (requests * (batch // len(requests) + 1))[:batch]
    unwrapped = ctx.unwrap_batch(msgs)
    now = int(time.time())
    issue_items = [IssueRequest(request=u, serial=10**18 + i, not_before=now - 600,
                                not_after=now + 86400 * 365) for i, u in enumerate(unwrapped)]
    certs = ctx.issue_batch(issue_items)
    specs = [CertRepSpec(request=u, status=0, certs=[c, ca_cert])  # type: ignore[list-item]
             for u, c in zip(unwrapped, certs, strict=True)]
    for u in unwrapped:
        u.raise_for_error()
    return {
        "unwrap_us": cpu_per_item(lambda: len(ctx.unwrap_batch(msgs)), seconds),
        "issue_us": cpu_per_item(lambda: len(ctx.issue_batch(issue_items)), seconds),
        "wrap_us": cpu_per_item(lambda: len(ctx.wrap_batch(specs)), seconds),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--batch", type=int, default=32, help="items per native call")
    args = parser.parse_args()

    requests = build_requests(8)
    ra, ca = load_keypair("ra"), load_keypair("ca")
    rsa_ctx = ScepContext(recipients=[ra], signer=ra, issuer=ca)
    ec_ca = p256_ca()
    ec_ctx = ScepContext(recipients=[ra], signer=ra, issuer=ec_ca)

    # `openssl speed` runs before and after the core's measurements and the
    # two are averaged: on a shared or virtual machine the CPU's speed drifts
    # by several percent within a minute, and one side-measurement would
    # carry that drift into the ratio.
    speed_seconds = max(1, round(args.seconds))
    sign_before = openssl_rsa2048_sign_us(speed_seconds)
    rsa = measure(rsa_ctx, requests, args.batch, args.seconds, ca[0])
    ecdsa = measure(ec_ctx, requests, args.batch, args.seconds, ec_ca[0])
    sign_after = openssl_rsa2048_sign_us(speed_seconds)
    sign_us = (sign_before + sign_after) / 2
    total = rsa["unwrap_us"] + rsa["issue_us"] + rsa["wrap_us"]
    ratio = total / (3 * sign_us)

    print(f"{'step (CPU us per request)':28} {'RSA-2048 CA':>12} {'P-256 CA':>12}")
    for step in ("unwrap_us", "issue_us", "wrap_us"):
        print(f"{step[:-3]:28} {rsa[step]:12.1f} {ecdsa[step]:12.1f}")
    ec_total = ecdsa["unwrap_us"] + ecdsa["issue_us"] + ecdsa["wrap_us"]
    print(f"{'total':28} {total:12.1f} {ec_total:12.1f}")
    print(f"openssl speed rsa2048: {sign_us:.1f} us per sign (before {sign_before:.1f}, "
          f"after {sign_after:.1f}); "
          f"floor 3 x sign = {3 * sign_us:.1f} us")
    print(f"ratio (RSA-2048 CA total / floor): {ratio:.3f}")
    print(json.dumps({
        "unwrap_us": round(rsa["unwrap_us"], 1),
        "issue_us": round(rsa["issue_us"], 1),
        "wrap_us": round(rsa["wrap_us"], 1),
        "rsa2048_sign_us": round(sign_us, 1),
        "ratio": round(ratio, 3),
        "p256_ca_unwrap_us": round(ecdsa["unwrap_us"], 1),
        "p256_ca_issue_us": round(ecdsa["issue_us"], 1),
        "p256_ca_wrap_us": round(ecdsa["wrap_us"], 1),
        "batch": args.batch,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
