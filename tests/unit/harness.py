"""The enrollment service as a worker runs it, for tests that drive it directly.

Our RA and CA from tests/vectors, a retired CA and an impostor CA made here,
profiles that exercise each rule, a clock the tests move, and helpers that
send PKCSReqs through the service and read the signed answers as a device.
"""

from __future__ import annotations

import datetime
import hashlib
from pathlib import Path
from typing import Any, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep_fast.client.messages import CertRep, PkiRequest, generate_key, parse_cert_rep
from scep_fast.crypto import ScepContext, der_certificate, der_private_key
from scep_fast.protocol import FailInfo, PKIStatus
from scep_fast.service.challenges import mint_challenge
from scep_fast.service.enrollment import Answer, EnrollmentService, Policy
from scep_fast.service.ledger import Ledger
from scep_fast.service.profile import Profile

VECTORS = Path(__file__).resolve().parents[1] / "vectors"
STATIC = "static-secret-for-tests"
PROFILES = {
    "default": Profile(),
    "dns-only": Profile(name="dns-only", san_types=("dns",)),
    "multi-cn": Profile(name="multi-cn", allow_multiple_cn=True),
    "may-drop": Profile(name="may-drop", renewal_may_drop_sans=True),
    "approval": Profile(name="approval", require_approval=True),
    "good-uris": Profile(name="good-uris", san_types=("uri",),
                         san_pattern=r"https://good\.example/.*"),
}


class Clock:
    def __init__(self) -> None:
        self.now = datetime.datetime.now(datetime.UTC).timestamp()

    def __call__(self) -> float:
        return self.now


def _pem(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def _new_ca(cn: str, key: rsa.RSAPrivateKey | None = None) -> tuple[x509.Certificate, Any]:
    key = key or cast(rsa.RSAPrivateKey, generate_key("rsa2048"))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def _der_key(key: Any) -> bytes:
    return der_private_key(key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))


class Pki:
    """Our RA, the CA that issues now, a retired CA, and an impostor with our CA's name."""

    def __init__(self) -> None:
        self.ra = x509.load_pem_x509_certificate(_pem("ra.pem"))
        self.ra_pair = (der_certificate(_pem("ra.pem")), der_private_key(_pem("ra.key")))
        self.ca_pair = (der_certificate(_pem("ca.pem")), der_private_key(_pem("ca.key")))
        ca = x509.load_pem_x509_certificate(_pem("ca.pem"))
        old, old_key = _new_ca("scep-fast retired test CA")
        self.old_pair = (old.public_bytes(serialization.Encoding.DER), _der_key(old_key))
        impostor, impostor_key = _new_ca(ca.subject.get_attributes_for_oid(
            NameOID.COMMON_NAME)[0].value)  # type: ignore[arg-type]
        self.impostor_pair = (impostor.public_bytes(serialization.Encoding.DER),
                              _der_key(impostor_key))

    def context(self, issuer: tuple[bytes, bytes]) -> ScepContext:
        return ScepContext(recipients=[self.ra_pair], signer=self.ra_pair, issuer=issuer)


class Service:
    """The service as a worker runs it, with helpers to send and read."""

    def __init__(self, pki: Pki, ledger: Ledger, clock: Clock,
                 issuer: tuple[bytes, bytes] | None = None,
                 retired: tuple[tuple[bytes, bytes], ...] = (),
                 policy: Policy | None = None) -> None:
        issuer = issuer or pki.ca_pair
        self.pki, self.ledger, self.clock = pki, ledger, clock
        self.enrollment = EnrollmentService(
            pki.context(issuer), ledger, policy or Policy(static_challenge=STATIC.encode()),
            PROFILES, [issuer[0], *[pair[0] for pair in retired]], clock=clock)

    def send(self, *requests: PkiRequest) -> list[Answer]:
        return self.enrollment.handle_batch([r.message for r in requests])

    def reply(self, request: PkiRequest) -> CertRep:
        (answer,) = self.send(request)
        assert answer.error is None, answer.reason
        return parse_cert_rep(answer.body, request, ra_certs=[self.pki.ra])

    def issued(self, request: PkiRequest) -> x509.Certificate:
        rep = self.reply(request)
        assert rep.status is PKIStatus.SUCCESS, rep.fail_info_text
        return rep.certificates[0]

    def refused(self, request: PkiRequest, fail_info: FailInfo = FailInfo.BAD_REQUEST) -> str:
        before = self.ledger.count()
        rep = self.reply(request)
        assert rep.status is PKIStatus.FAILURE
        assert rep.fail_info is fail_info
        assert self.ledger.count() == before, "a refused request left a certificate on record"
        return rep.fail_info_text or ""

    def challenge(self, *, uses: int = 1, profile: str = "default", subject_pattern: str = "",
                  san_pattern: str = "") -> str:
        return mint_challenge(self.ledger, now=self.clock(), ttl_seconds=3600, uses=uses,
                              profile=profile, profiles=PROFILES,
                              subject_pattern=subject_pattern, san_pattern=san_pattern).secret

    def uses_left(self, secret: str) -> int:
        found = self.ledger.get_challenge(hashlib.sha256(secret.encode()).digest())
        assert found is not None
        return found.uses_left
