"""Every kind of certificate and CRL scep-fast makes passes pkilint's RFC 5280 lints.

pkilint (DigiCert's linter) checks a document against RFC 5280 and the RFCs it
leans on (key usages per algorithm, name syntax, criticality). What is linted:

* the CA and RA certificates `scep-fast init` makes, for each CA key type and
  in CA mode, and the RA certificate as issued by its CA (signature, names,
  key identifiers);
* certificates issued through the enrollment service, from a real PKCSReq, for
  each profile shape (default, subject template, chain in the reply, CRL
  distribution point, key usage and extended key usage variants), each device
  key type (RSA-2048, RSA-3072, EC P-256, EC P-384), each kind of subjectAltName
  and a mix of them, under RSA and EC CAs, each also as issued by its CA;
* CRLs, empty and with revoked entries of every reason.

A finding fails the test unless _allowed accepts it (each with its reason).
Requests for names out of RFC 5280 syntax must be refused, not issued.
"""

from __future__ import annotations

import datetime
import ipaddress
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID, NameOID
from pkilint import loader, pkix
from pkilint.bin import lint_pkix_signer_signee_cert_chain as chain_linter
from pkilint.pkix import certificate, extension, name
from pkilint.pkix import crl as pkix_crl
from pkilint.validation import ValidationResult

from scep_fast.client.messages import (
    DeviceKey,
    KeyKind,
    build_pki_message,
    build_signer_certificate,
    generate_key,
    parse_cert_rep,
)
from scep_fast.crypto import ScepContext
from scep_fast.protocol import MessageType
from scep_fast.runtime import config as configuration
from scep_fast.runtime import crl
from scep_fast.runtime.pki import Material, load_material
from scep_fast.service.enrollment import EnrollmentService, Policy
from scep_fast.service.ledger import REVOCATION_REASONS
from scep_fast.service.ledger_memory import MemoryLedger
from scep_fast.service.profile import Profile
from tests.integration.conftest import init_dir

PUBLIC_URL = "http://pki.example.test/scep-fast"
DER = serialization.Encoding.DER


# ---- pkilint ------------------------------------------------------------------------

# pkilint's RFC 5280 linters, put together as its lint_pkix_cert and lint_crl
# commands do.
CERTIFICATE_LINTER = certificate.create_pkix_certificate_validator_container(
    certificate.create_decoding_validators(name.ATTRIBUTE_TYPE_MAPPINGS,
                                           extension.EXTENSION_MAPPINGS),
    [
        certificate.create_issuer_validator_container([]),
        certificate.create_validity_validator_container(),
        certificate.create_subject_validator_container([]),
        certificate.create_extensions_validator_container([]),
        certificate.create_spki_validator_container([]),
    ],
)
CRL_LINTER = pkix_crl.create_pkix_crl_validator_container(
    [
        pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
        pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
    ],
    [
        pkix_crl.create_issuer_validator_container([]),
        pkix_crl.create_validity_validator_container([]),
        pkix_crl.create_extensions_validator_container([]),
    ],
)

# A URN names its thing without an authority, e.g. a device by UUID (RFC 4122).
URN = "urn:uuid:f81d4fae-7dec-11d0-a765-00a0c91e6bf6"


@dataclass(frozen=True)
class Finding:
    severity: str  # FATAL, ERROR, WARNING, NOTICE or INFO
    code: str
    message: str
    path: str

    def __str__(self) -> str:
        text = f"{self.severity} {self.code} at {self.path}"
        return f"{text}: {self.message}" if self.message else text


def _allowed(finding: Finding) -> bool:
    """The findings we accept, each with the reason."""
    # Informational: pkilint says how the subjectKeyIdentifier was made. Ours is
    # RFC 5280 section 4.2.1.2 method 1, the SHA-1 of the subjectPublicKey.
    if finding.code == "pkix.subject_key_identifier_method_1_identified":
        return finding.severity == "INFO"
    # pkilint checks a URI in a GeneralName with a URL validator, which knows no
    # URN. RFC 5280 section 4.2.1.6 asks for an absolute URI with a scheme and a
    # scheme-specific part (RFC 3986); an authority, and then a host name, only
    # when the URI has one, which a URN does not. So this error is the linter's,
    # and it is accepted for exactly this URN.
    if finding.code == "pkix.invalid_uri_syntax":
        return finding.message == f'Invalid URI syntax: "{URN}"'
    return False


def _findings(results: list[ValidationResult]) -> list[Finding]:
    return [Finding(f.finding.severity.name, f.finding.code, f.message or "", r.node.path)
            for r in results for f in r.finding_descriptions]


def lint_certificate(der: bytes) -> list[Finding]:
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    return _findings(CERTIFICATE_LINTER.validate(document.root))


def lint_crl(der: bytes) -> list[Finding]:
    document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "crl")
    return _findings(CRL_LINTER.validate(document.root))


def lint_issued_by(issuer_der: bytes, subject_der: bytes) -> list[Finding]:
    """pkilint's issuer/subject lints: names, key identifiers, the signature."""
    documents: dict[str, object] = {}
    load = loader.RFC5280CertificateDocumentLoader().load_der_document
    issuer = load(issuer_der, "issuer", "issuer", documents)
    documents["issuer"] = issuer
    subject = load(subject_der, "subject", "subject", documents)
    documents["subject"] = subject
    decoders = chain_linter.create_decoder_validation_container()
    results = decoders.validate(issuer.root) + decoders.validate(subject.root)
    results += chain_linter.create_issuer_validation_container().validate(issuer.root)
    results += chain_linter.create_subject_validation_container().validate(subject.root)
    return _findings(results)


def assert_clean(findings: list[Finding]) -> None:
    """No finding but the allowed ones."""
    unexpected = [f for f in findings if not _allowed(f)]
    assert not unexpected, "pkilint findings:\n" + "\n".join(f"  {f}" for f in unexpected)


# ---- a CA and the enrollment service ------------------------------------------------


class Issuer:
    """The PKI of a `scep-fast init` directory and the enrollment service over it."""

    def __init__(self, directory: Path) -> None:
        self.material: Material = load_material(configuration.load(directory))
        self.ra = x509.load_der_x509_certificate(self.material.ra_cert)
        self.ctx = ScepContext(recipients=[self.material.signer], signer=self.material.signer,
                               issuer=(self.material.ca_cert, self.material.ca_key))
        self.ledger = MemoryLedger()
        # One requester signs every request; each request has its own
        # transactionID, so none is taken for a resend of another.
        self.signer_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.signer_cert = build_signer_certificate(self.signer_key, "pkilint-device")

    @overload
    def issue(self, profile: Profile, csr_der: bytes) -> list[bytes]: ...

    @overload
    def issue(self, profile: Profile, csr_der: bytes, *,
              refused_ok: bool) -> list[bytes] | None: ...

    def issue(self, profile: Profile, csr_der: bytes, *,
              refused_ok: bool = False) -> list[bytes] | None:
        """The certificates of the SUCCESS reply to a PKCSReq for csr_der, leaf first.

        With refused_ok, None for a FAILURE badRequest reply.
        """
        service = EnrollmentService(
            self.ctx, self.ledger,
            Policy(static_challenge=self.material.challenge, default_profile=profile.name),
            {profile.name: profile}, [self.material.ca_cert])
        request = build_pki_message(
            MessageType.PKCS_REQ, csr_der, recipient=self.ra, signer_key=self.signer_key,
            signer_cert=self.signer_cert, transaction_id=secrets.token_hex(16), csr=csr_der)
        (answer,) = service.handle_batch([request.message])
        if refused_ok and answer.status == "FAILURE" and answer.fail_info == "BAD_REQUEST":
            return None
        assert answer.status == "SUCCESS", f"{answer.status}: {answer.reason}"
        reply = parse_cert_rep(answer.body, request, ra_certs=[self.ra])
        return [c.public_bytes(DER) for c in reply.certificates]


def csr(key: DeviceKey, subject: x509.Name, sans: list[x509.GeneralName],
        challenge: bytes) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge)
    return builder.sign(key, hashes.SHA256()).public_bytes(DER)


def cn(value: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, value)])


# `scep-fast init` arguments, by the name the tests use.
CA_KINDS = {
    "rsa2048": [],
    "rsa3072": ["--ca-key", "rsa3072"],
    "p256": ["--ca-key", "p256"],
    "p384": ["--ca-key", "p384"],
    "ca-mode": ["--ca-mode"],
}
KEY_TYPES: tuple[KeyKind, ...] = ("rsa2048", "rsa3072", "ec-p256", "ec-p384")


@pytest.fixture(scope="module")
def issuers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Issuer]]:
    """issuers(kind): the Issuer of a directory made by `scep-fast init`, one per kind."""
    made: dict[str, Issuer] = {}

    def get(kind: str) -> Issuer:
        if kind not in made:
            directory = init_dir(tmp_path_factory.mktemp(f"pkilint-{kind}") / "scep",
                                 *CA_KINDS[kind])
            made[kind] = Issuer(directory)
        return made[kind]

    yield get


@pytest.fixture(scope="module")
def device_keys() -> dict[str, DeviceKey]:
    return {kind: generate_key(kind) for kind in KEY_TYPES}


def assert_issued_clean(issuer: Issuer, certs: list[bytes]) -> None:
    """The leaf, everything else in the reply, and the leaf as issued by the CA."""
    assert_clean(lint_certificate(certs[0]) + lint_issued_by(issuer.material.ca_cert, certs[0]))
    for other in certs[1:]:
        assert_clean(lint_certificate(other))


# ---- the CA and RA certificates -------------------------------------------------------


@pytest.mark.parametrize("kind", list(CA_KINDS))
def test_init_ca_and_ra_certificates(issuers: Callable[[str], Issuer], kind: str) -> None:
    material = issuers(kind).material
    assert_clean(lint_certificate(material.ca_cert))
    if material.mode == "ra":
        assert_clean(lint_certificate(material.ra_cert))
        assert_clean(lint_issued_by(material.ca_cert, material.ra_cert))


# ---- issued certificates: profiles x device keys --------------------------------------

PROFILES: dict[str, dict[str, object]] = {
    "default": {},
    "subject-template": {"subject_template": "CN={cn},OU=Devices,O=Example,C=US"},
    "include-chain": {"include_chain": True},
    "crl-url": {"crl_url": "the CA's own, see make_profile"},
    "ku-signature-non-repudiation": {"key_usage": ("digital_signature", "non_repudiation")},
    "ku-signature-key-encipherment": {"key_usage": ("digital_signature", "key_encipherment")},
    "ku-data-encipherment": {"key_usage": ("data_encipherment",)},
    "ku-key-agreement": {"key_usage": ("key_agreement",)},
    "eku-none": {"extended_key_usage": ()},
    "eku-server-client": {"extended_key_usage": ("server_auth", "client_auth")},
    "eku-email": {"extended_key_usage": ("email_protection",)},
    "eku-code-signing": {"extended_key_usage": ("code_signing",)},
    "eku-ocsp-signing": {"extended_key_usage": ("ocsp_signing",)},
    "eku-ipsec-ike": {"extended_key_usage": ("ipsec_ike",)},
    "eku-time-stamping": {"extended_key_usage": ("time_stamping",)},
}

def _profile_cases() -> list[object]:
    return [pytest.param(profile, key_type, id=f"{profile}-{key_type}")
            for profile in PROFILES for key_type in KEY_TYPES]


def make_profile(profile: str, issuer: Issuer) -> Profile:
    fields = dict(PROFILES[profile])
    if "crl_url" in fields:
        fields["crl_url"] = crl.crl_url(PUBLIC_URL, issuer.material.ca_cert)
    return Profile(name=profile, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("profile", "key_type"), _profile_cases())
def test_profiles(issuers: Callable[[str], Issuer], device_keys: dict[str, DeviceKey],
                  profile: str, key_type: str) -> None:
    issuer = issuers("rsa2048")
    chosen = make_profile(profile, issuer)
    certs = issuer.issue(chosen, csr(device_keys[key_type], cn("device-1.example"),
                                     [x509.DNSName("device-1.example")],
                                     issuer.material.challenge))
    assert len(certs) == (2 if chosen.include_chain else 1)
    issued = x509.load_der_x509_certificate(certs[0])
    if chosen.subject_template:
        assert issued.subject == chosen.render_subject("device-1.example")
    if chosen.crl_url:
        points = issued.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert points[0].full_name == [x509.UniformResourceIdentifier(chosen.crl_url)]
    assert_issued_clean(issuer, certs)


# ---- issued certificates: subjectAltNames x device keys -------------------------------

SANS: dict[str, list[x509.GeneralName]] = {
    "none": [],
    "dns": [x509.DNSName("device-2.example")],
    "email": [x509.RFC822Name("device-2@example.com")],
    "uri": [x509.UniformResourceIdentifier("https://device-2.example/id/42")],
    "urn": [x509.UniformResourceIdentifier(URN)],
    "ip": [x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
           x509.IPAddress(ipaddress.ip_address("2001:db8::7"))],
    "several": [x509.DNSName("device-2.example"), x509.DNSName("www.device-2.example"),
                x509.RFC822Name("device-2@example.com"),
                x509.UniformResourceIdentifier("https://device-2.example/id/42"),
                x509.IPAddress(ipaddress.ip_address("192.0.2.7"))],
}


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("sans", list(SANS))
def test_subject_alt_names(issuers: Callable[[str], Issuer],
                           device_keys: dict[str, DeviceKey], sans: str, key_type: str) -> None:
    issuer = issuers("rsa2048")
    certs = issuer.issue(Profile(), csr(device_keys[key_type], cn("device-2.example"),
                                        SANS[sans], issuer.material.challenge))
    issued = x509.load_der_x509_certificate(certs[0])
    if SANS[sans]:
        san = issued.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert list(san) == SANS[sans]
    assert_issued_clean(issuer, certs)


# Names a CSR may ask for that do not follow RFC 5280 section 4.2.1.6: a
# dNSName in preferred name syntax (RFC 1034 section 3.5), an rfc822Name that
# is a mailbox (RFC 5321 section 4.1.2), an absolute URI. The service refuses
# them with badRequest; they never reach a certificate.
BAD_SANS = {
    "dns-space": x509.DNSName("device 5.example"),
    # RFC 5280 leaves wildcards undefined; in its preferred name syntax "*" is no label.
    "dns-wildcard": x509.DNSName("*.device-5.example"),
    "email-no-domain": x509.RFC822Name("device-5"),
    "uri-relative": x509.UniformResourceIdentifier("devices/5"),
}


@pytest.mark.parametrize("bad", list(BAD_SANS))
def test_subject_alt_names_out_of_syntax_are_refused(
        issuers: Callable[[str], Issuer], device_keys: dict[str, DeviceKey], bad: str) -> None:
    issuer = issuers("rsa2048")
    value = BAD_SANS[bad]
    certs = issuer.issue(Profile(), csr(device_keys["ec-p256"], cn("device-5.example"),
                                        [x509.DNSName("device-5.example"), value],
                                        issuer.material.challenge), refused_ok=True)
    assert certs is None, "a name out of RFC 5280 syntax was issued"


def test_empty_subject_with_only_subject_alt_names(
        issuers: Callable[[str], Issuer], device_keys: dict[str, DeviceKey]) -> None:
    # RFC 5280 section 4.2.1.6: with an empty subject the subjectAltName
    # extension carries the identity and must be critical.
    issuer = issuers("rsa2048")
    certs = issuer.issue(Profile(), csr(device_keys["ec-p256"], x509.Name([]),
                                        [x509.DNSName("device-3.example"),
                                         x509.RFC822Name("device-3@example.com")],
                                        issuer.material.challenge))
    assert x509.load_der_x509_certificate(certs[0]).subject == x509.Name([])
    assert_issued_clean(issuer, certs)


# ---- issued certificates: other CAs ---------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
@pytest.mark.parametrize("ca_kind", ["rsa3072", "p256", "p384", "ca-mode"])
def test_other_issuing_cas(issuers: Callable[[str], Issuer], device_keys: dict[str, DeviceKey],
                           ca_kind: str, key_type: str) -> None:
    issuer = issuers(ca_kind)
    profile = Profile(name="chain", include_chain=True,
                      crl_url=crl.crl_url(PUBLIC_URL, issuer.material.ca_cert))
    certs = issuer.issue(profile, csr(device_keys[key_type], cn("device-4.example"),
                                      [x509.DNSName("device-4.example")],
                                      issuer.material.challenge))
    assert_issued_clean(issuer, certs)


# ---- CRLs -----------------------------------------------------------------------------


@pytest.mark.parametrize("ca_kind", ["rsa2048", "p384"])
def test_crls(issuers: Callable[[str], Issuer], device_keys: dict[str, DeviceKey],
              ca_kind: str) -> None:
    issuer = issuers(ca_kind)
    material = issuer.material
    now = datetime.datetime.now(datetime.UTC)
    ledger = MemoryLedger()

    def current_crl() -> bytes:
        return crl.generate_crl(ledger, material.ca_cert, material.ca_key, validity_hours=48,
                                now=now)

    empty = current_crl()
    assert len(x509.load_der_x509_crl(empty)) == 0
    assert_clean(lint_crl(empty))

    # One revoked certificate per reason code, unspecified (no reasonCode entry
    # extension) and removeFromCRL (left out of a full CRL) included.
    for reason in sorted(REVOCATION_REASONS):
        (der, *_) = issuer.issue(Profile(), csr(device_keys["ec-p256"], cn(f"revoked-{reason}"),
                                                [], material.challenge))
        record = issuer.ledger.get(x509.load_der_x509_certificate(der).serial_number)
        assert record is not None
        ledger.commit([record])
        ledger.revoke(record.serial, reason, time.time())
    revoked = current_crl()
    assert len(x509.load_der_x509_crl(revoked)) == len(REVOCATION_REASONS) - 1
    assert_clean(lint_crl(revoked))
