"""Are a bad key-transport padding and a bad content padding answered alike, and as fast?

    python benchmarks/padding_timing.py                # 300 of each kind, RA key in SoftHSM2
    python benchmarks/padding_timing.py --count 30     # a smoke run
    python benchmarks/padding_timing.py --keys file    # the same against key files
    python benchmarks/padding_timing.py --core         # the core alone, in this process

A padding oracle needs the server to tell a wrong RSA padding of the
envelope's content key from a right one. OpenSSL's CMS answers a wrong one
with a random content key, so both end as a content that does not decrypt;
the RA key in a token must keep that (issue 13). This starts a server the way
``compare.py --keys softhsm`` does (a fresh SoftHSM2 token, the CA and RA keys
generated inside it, two workers) and sends, one at a time over one keep-alive
connection, PKCSReqs of three kinds in an interleaved random order:

- ``valid``: a correct request (answered SUCCESS with a certificate);
- ``bad_key``: the content key's RSA block replaced by a random number below
  the RA's modulus, so its PKCS#1 v1.5 padding is wrong;
- ``bad_content``: the right content key, the last CBC block's padding made
  wrong (as in tests/native/test_token_keys.py).

Each is correctly signed by its requester, so it reaches the decryption.
Reported per kind: the server's own time for the request (``duration_ms`` of
its log line, from the request's arrival to the answer's last byte) and the
client's round trip, as median, p90 and p99; and each kind's answers by HTTP
status, pkiStatus, failInfo, failInfoText and length, which for the two bad
kinds must be one and the same.

``--core`` leaves the server out: this process loads the same RA key (from
the token through libp11, or the file) into the native core and times
``ScepContext.unwrap_batch`` on each message alone, so a difference seen
through HTTP can be placed in the decryption or outside it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import http.client
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
# tests.softhsm and tests.native.hostile_helpers: the tests' token and message builders.
sys.path.insert(1, str(ROOT))

import compare  # noqa: E402
import loadgen  # noqa: E402

KINDS = ("valid", "bad_key", "bad_content")
KEY_POOL = 8
WARM_UP = 10


def _attributes(body: bytes) -> dict[str, Any]:
    """The CertRep's pkiStatus, failInfo and failInfoText, as the signer put them."""
    from scep_fast.protocol.enums import OID_FAIL_INFO, OID_FAIL_INFO_TEXT, OID_PKI_STATUS

    signed = cms.ContentInfo.load(body)["content"]
    (signer_info,) = list(signed["signer_infos"])
    out: dict[str, Any] = {}
    for attr in signer_info["signed_attrs"]:
        oid = attr["type"].dotted
        name = {OID_PKI_STATUS: "pki_status", OID_FAIL_INFO: "fail_info",
                OID_FAIL_INFO_TEXT: "fail_info_text"}.get(oid)
        if name is not None:
            out[name] = attr["values"][0].native
    return out


class Builder:
    """PKCSReqs of each kind for one RA, each signed by its requester (the tests' builder)."""

    def __init__(self, ra: x509.Certificate, seed: int) -> None:
        from scep_fast.client import generate_key

        self.ra = ra
        self.rng = random.Random(seed)
        self.keys = [generate_key("rsa2048") for _ in range(KEY_POOL)]
        public = ra.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        self.modulus = public.public_numbers().n
        self.run = os.urandom(4).hex()

    def build(self, kind: str, index: int) -> tuple[str, bytes]:
        from scep_fast.client import build_csr, build_envelope
        from tests.native.hostile_helpers import B, Device

        key = self.keys[index % KEY_POOL]
        assert isinstance(key, rsa.RSAPrivateKey)
        cn = f"padding-{self.run}-{index:06d}"
        transaction_id = f"padding-{self.run}-{index:06d}"
        csr = build_csr(key, cn, challenge=compare.CHALLENGE)
        envelope = build_envelope(csr, self.ra)
        enveloped = cms.ContentInfo.load(envelope)["content"]
        if kind == "bad_key":
            wrapped = enveloped["recipient_infos"][0].chosen["encrypted_key"].contents
            forged = self.rng.randrange(2, self.modulus).to_bytes(len(wrapped), "big")
            envelope = envelope.replace(wrapped, forged)
        elif kind == "bad_content":
            ciphertext = enveloped["encrypted_content_info"]["encrypted_content"].contents
            damaged = bytearray(ciphertext)
            # In CBC the last block's padding is the block before it XORed in: this
            # makes the last plaintext byte 0, which no PKCS#7 padding ends with.
            damaged[-17] ^= 16 - len(csr) % 16
            envelope = envelope.replace(ciphertext, bytes(damaged))
        device = Device(key=key, cert=B.make_signer_cert(key, cn), ra=self.ra)
        message = device.pkcsreq(envelope, transaction_id=B.printable(transaction_id),
                                 sender_nonce=B.octets(os.urandom(16)))
        return transaction_id, message


def core_context(keys: str, token: Any) -> tuple[Any, x509.Certificate]:
    """The native core with the RA (and CA) key of the token, or of the key files."""
    from cryptography.hazmat.primitives import serialization

    from scep_fast.crypto import Pkcs11Module, ScepContext, der_private_key
    from tests import softhsm

    if keys == "softhsm":
        # SoftHSM2 reads SOFTHSM2_CONF when this process first opens the module.
        os.environ["SOFTHSM2_CONF"] = str(token.token.conf)
        module = Pkcs11Module(token.token.module, softhsm.PIN.encode())
        label = token.token.label
        ra_key = module.load_key(f"pkcs11:token={label};object={softhsm.RA_OBJECT};type=private")
        ca_key = module.load_key(f"pkcs11:token={label};object={softhsm.CA_OBJECT};type=private")
        directory = token.template
    else:
        directory = compare.scep_fast_template("rsa2048")
        ra_key = der_private_key((directory / "ra.key").read_bytes())
        ca_key = der_private_key((directory / "ca.key").read_bytes())
    ra = x509.load_pem_x509_certificate((directory / "ra.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ra_der = ra.public_bytes(serialization.Encoding.DER)
    ca_der = ca.public_bytes(serialization.Encoding.DER)
    ctx = ScepContext(recipients=[(ra_der, ra_key)], signer=(ra_der, ra_key),
                      issuer=(ca_der, ca_key))
    return ctx, ra


def measure_core(ctx: Any, builder: Builder, count: int, seed: int) -> list[dict[str, Any]]:
    """Each message alone through unwrap_batch: its time and what the core made of it."""
    rng = random.Random(seed)
    order = [kind for _ in range(count) for kind in rng.sample(KINDS, len(KINDS))]
    progress = loadgen.Progress(len(order), "building requests")
    messages = []
    for i, kind in enumerate(order):
        messages.append((kind, *builder.build(kind, i)))
        progress.update(1)
    for _, _, message in messages[:WARM_UP]:
        ctx.unwrap_batch([message])
    out = []
    for kind, transaction_id, message in messages:
        started = time.perf_counter()
        (result,) = ctx.unwrap_batch([message])
        elapsed = time.perf_counter() - started
        error = result.error
        out.append({"kind": kind, "transaction_id": transaction_id,
                    "client_ms": elapsed * 1000, "server_ms": elapsed * 1000,
                    "server_reason": "-" if error is None else error.summary,
                    "answer": {"error": "-" if error is None else type(error).__name__}})
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "median": loadgen.percentile(values, 50),
            "p90": loadgen.percentile(values, 90), "p99": loadgen.percentile(values, 99)}


def server_lines(log_path: Path, samples: list[dict[str, Any]]) -> None:
    """Adds to each sample its request's log line (duration_ms, outcome, reason).

    A refused envelope's line carries no transactionID (the message is not read
    past it), so lines and samples are paired by order: one connection, one
    request at a time, all on one worker. The valid ones' IDs check the pairing.
    """
    lines = []
    for text in log_path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("msg") == "request" \
                and entry.get("operation") == "PKIOperation":
            lines.append(entry)
    if len(lines) < len(samples):
        raise RuntimeError(f"{len(lines)} PKIOperation log lines for {len(samples)} requests")
    for sample, entry in zip(samples, lines[-len(samples):], strict=True):
        if sample["kind"] == "valid" and entry.get("transaction_id") != sample["transaction_id"]:
            raise RuntimeError("the server's log lines are not in the order of the requests")
        sample["server_ms"] = float(entry["duration_ms"])
        sample["server_reason"] = entry.get("reason", "-")


def measure(url: str, builder: Builder, count: int, seed: int,
            timeout: float) -> list[dict[str, Any]]:
    # Different orders in every triple, not one order repeated.
    rng = random.Random(seed)
    order = [kind for _ in range(count) for kind in rng.sample(KINDS, len(KINDS))]
    progress = loadgen.Progress(len(order) + WARM_UP, "building requests")
    warm = []
    for i in range(WARM_UP):
        warm.append(builder.build("valid", i))
        progress.update(1)
    messages = []
    for i, kind in enumerate(order, WARM_UP):
        messages.append((kind, *builder.build(kind, i)))
        progress.update(1)
    host, _, rest = url.removeprefix("http://").partition("/")
    hostname, _, port = host.partition(":")
    conn = http.client.HTTPConnection(hostname, int(port), timeout=timeout)
    path = "/" + rest + "?operation=PKIOperation"
    headers = {"Content-Type": "application/x-pki-message"}
    for _, message in warm:  # every session and cache warm before the clock
        conn.request("POST", path, body=message, headers=headers)
        conn.getresponse().read()
    out = []
    for kind, transaction_id, message in messages:
        started = time.perf_counter()
        conn.request("POST", path, body=message, headers=headers)
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        answer: dict[str, Any] = {"http": response.status, "length": len(body)}
        if response.status == 200:
            answer.update(_attributes(body))
        else:  # a refusal's body is the same for every request it refuses
            answer["body_sha256"] = hashlib.sha256(body).hexdigest()[:16]
        out.append({"kind": kind, "transaction_id": transaction_id,
                    "client_ms": elapsed * 1000, "answer": answer})
    conn.close()
    return out


def report(samples: list[dict[str, Any]]) -> dict[str, Any]:
    per_kind: dict[str, Any] = {}
    for kind in KINDS:
        mine = [s for s in samples if s["kind"] == kind]
        answers = collections.Counter(
            json.dumps(s["answer"], sort_keys=True) for s in mine)
        reasons = collections.Counter(s["server_reason"] for s in mine)
        per_kind[kind] = {
            "server_ms": percentiles([s["server_ms"] for s in mine]),
            "client_ms": percentiles([s["client_ms"] for s in mine]),
            "answers": dict(answers.most_common()),
            "logged_reasons": dict(reasons.most_common()),
        }
    bad = [set(per_kind[k]["answers"]) for k in ("bad_key", "bad_content")]
    logged = [set(per_kind[k]["logged_reasons"]) for k in ("bad_key", "bad_content")]
    return {"kinds": per_kind, "bad_answers_alike": bad[0] == bad[1] and len(bad[0]) == 1,
            "bad_reasons_alike": logged[0] == logged[1] and len(logged[0]) == 1,
            "bad_key_minus_bad_content_median_ms":
                per_kind["bad_key"]["server_ms"]["median"]
                - per_kind["bad_content"]["server_ms"]["median"]}


def markdown(result: dict[str, Any], what: str = "server ms") -> str:
    rows = [f"| kind | n | {what} median | p90 | p99 | client median ms | p90 | p99 "
            "| answers (count x HTTP, bytes, body SHA-256 or pkiStatus, failInfo) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for kind, data in result["kinds"].items():
        s, c = data["server_ms"], data["client_ms"]
        answers = "; ".join(
            f"{n} x " + ", ".join(str(v) for v in json.loads(a).values())
            for a, n in data["answers"].items())
        rows.append(f"| {kind} | {s['n']} | {s['median']:.2f} | {s['p90']:.2f} "
                    f"| {s['p99']:.2f} | {c['median']:.2f} | {c['p90']:.2f} "
                    f"| {c['p99']:.2f} | {answers} |")
    rows += ["", f"The two bad kinds answered alike: {result['bad_answers_alike']}; "
             f"logged alike: {result['bad_reasons_alike']}; "
             "server median bad_key - bad_content: "
             f"{result['bad_key_minus_bad_content_median_ms']:+.3f} ms."]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=300, help="requests of each kind")
    parser.add_argument("--keys", choices=("softhsm", "file"), default="softhsm",
                        help="where the server's CA and RA keys are (default softhsm)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--core", action="store_true",
                        help="time the native core's unwrap in this process, no server")
    args = parser.parse_args(argv)
    if args.core:
        with contextlib.ExitStack() as stack:
            token = stack.enter_context(compare.softhsm_keys()) \
                if args.keys == "softhsm" else None
            ctx, ra = core_context(args.keys, token)
            samples = measure_core(ctx, Builder(ra, args.seed), args.count, args.seed)
        result = report(samples)
        result["keys"] = args.keys
        print(markdown(result, "unwrap ms"))
        print(json.dumps(result))
        return 0

    scenario = compare.Scenario("scep-fast", "rsa2048", "post", 1, keys=args.keys)
    with tempfile.TemporaryDirectory(prefix="scep-bench-padding-") as tmp:
        run_dir = Path(tmp)
        if args.keys == "softhsm":
            with compare.softhsm_keys() as token:
                builder = Builder(token.ra, args.seed)
                server = compare.token_server(scenario, args.workers, run_dir, token)
                try:
                    samples = measure(server.url, builder, args.count, args.seed,
                                      args.timeout)
                finally:
                    server.stop()
        else:
            server = compare.ScepFastServer(scenario, args.workers, run_dir)
            try:
                builder = Builder(compare.ra_certificate("scep-fast", "rsa2048"), args.seed)
                samples = measure(server.url, builder, args.count, args.seed, args.timeout)
            finally:
                server.stop()
        server_lines(server.log_path, samples)
        result = report(samples)
    result["keys"] = args.keys
    result["command"] = "python benchmarks/padding_timing.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps({**result, "samples": samples}, indent=2) + "\n")
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
