"""Who may have which certificate: every rule, in the order it is applied.

The batch pipeline (``enrollment.py``) authenticates a message (the native
core verified its signature with the embedded signer certificate and opened
the envelope) and then asks :meth:`Authorizer.authorize` what the request
may have. The answer is a :class:`Grant`, or a ``MessageError`` whose text
says why not (it travels in the signed FAILURE's failInfoText; it names no
secret and nothing the requester did not send).

1. **The reply must be deliverable.** A SUCCESS is an envelope encrypted to
   the signer's key, and we encrypt to RSA keys only: any other signer key
   gets FAILURE badAlg before anything is issued or recorded.
2. **Who is asking.** A message signed by a certificate one of our CAs
   issued (its signature verifies under that CA) is a *renewal*: the
   certificate must be valid now, on record byte for byte, and neither
   revoked nor expired, or the request is refused outright (it never falls
   back to a challenge someone else may know). A RenewalReq signed by
   anything else is refused. Every other PKCSReq is a *first enrollment*
   and needs a challenge password.
3. **The challenge** (first enrollment): the static secret grants the
   default profile; a one-time challenge its own profile, while it is
   unexpired and has uses left. Compared as SHA-256 digests in constant
   time. The use is spent only when the certificate (or the pending
   request) is recorded, so a refused request spends nothing.
4. **The profile** decides the key (type, size, curve) and the names:
   SANs of types it does not allow are dropped, SANs it allows must match
   its ``san_pattern``, a subject template replaces the subject, and a
   subject with more than one CN is refused unless ``allow_multiple_cn``.
5. **Names a renewal may have**: the subject of the certificate it renews,
   exactly, and its SANs. The CSR must ask for that subject (or, under a
   subject template, for the CN that renders to it) and may not ask for a
   SAN the old certificate lacks; it may ask for fewer SANs only when the
   profile sets ``renewal_may_drop_sans``. It keeps the old certificate's
   profile (refused if that profile no longer exists) and needs no approval.
   The ledger's commit checks again that the old certificate is good, so
   one revoked while its renewal waited (for validators) renews nothing;
   with ``revoke_on_replace`` the commit revokes it with the new record, so
   a certificate renews once, whatever the batches and nodes
   (``ledger.py``, rules 2 and 5).
6. **Names a one-time challenge binds** (``subject_pattern``,
   ``san_pattern``; when either is set both apply): the whole subject the
   certificate will carry, as an RFC 4514 string with the most specific RDN
   first (``CN=device-42,O=Example``), must match ``subject_pattern`` in
   full, and every SAN value must match ``san_pattern`` in full. An empty
   pattern then allows no subject, or no SAN. A SAN value is read as the
   certificate carries it (a URI's own characters, not percent-decoded).
7. **A certificate names someone**: an empty subject needs a SAN.
8. **Approval**: a first enrollment under a profile with
   ``require_approval`` is recorded as pending instead of issued.
9. **External validators** (when configured: a webhook, Intune) come after
   every rule above, in the pipeline's validation stage: each must allow
   the request, or it is refused (fail closed; ``enrollment.py`` applies
   the verdicts). A validator may name the profile of a first enrollment:
   the grant is then made again under it by these same rules
   (``profile_name``) and may not give a name the validators were not
   shown; a renewal keeps its certificate's profile. With
   ``challenge_by_validators`` the validators check a first enrollment's
   challenge instead of rule 3: the default profile applies and nothing
   is spent here.

Plain synchronous code over the ledger port; the pipeline calls it per
request, in worker threads.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from scep_fast.crypto import CsrInfo
from scep_fast.protocol import BadAlg, BadMessageCheck, BadRequest, MessageType
from scep_fast.service.ledger import CertRecord, Ledger, PendingRequest, good_at, usable
from scep_fast.service.profile import (
    EMPTY_NAME,
    Profile,
    ProfileViolation,
    common_name,
    general_names,
    san_value,
)


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may enroll, and how renewals go."""

    # The static shared secret; empty: only one-time challenges and renewals.
    static_challenge: bytes = b""
    default_profile: str = "default"
    # Renewal only this close to the old certificate's expiry; 0: any time.
    renewal_window_days: int = 0
    revoke_on_replace: bool = False
    # External validators (a webhook, Intune) check the challenge password of a
    # first enrollment instead of this server: nothing is checked or spent
    # here, and the validation stage must allow every request.
    challenge_by_validators: bool = False
    # Validators are configured: a request they have not allowed gets nothing.
    external_validation: bool = False


@dataclass(frozen=True, slots=True)
class Signer:
    """The certificate that signed a message, parsed once."""

    der: bytes
    key_sha256: bytes
    cert: x509.Certificate | None  # None: our parser refused it

    @classmethod
    def parse(cls, der: bytes, key_sha256: bytes) -> Signer:
        try:
            cert = x509.load_der_x509_certificate(der)
            cert.public_key()  # parsed lazily otherwise; odd keys fail here, not later
        except Exception:  # noqa: BLE001 - any parser error means "not a certificate we read"
            cert = None
        return cls(der, key_sha256, cert)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may have: the certificate's names, its profile, and what it spends."""

    profile: Profile
    subject: Subject             # the subject the certificate gets
    san_der: bytes               # the subjectAltName value it gets ("" for none)
    sans: tuple[str, ...]        # the same names as text, for the ledger
    challenge: bytes | None      # digest of the one-time challenge to spend
    renews: CertRecord | None    # the certificate a renewal replaces
    needs_approval: bool


    @property
    def subject_der(self) -> bytes:
        return self.subject.der

    @property
    def subject_text(self) -> str:
        """The subject as an RFC 4514 string, most specific RDN first."""
        return self.subject.name.rfc4514_string()


_CN_TYPE = b"\x06\x03\x55\x04\x03"  # the DER of the common name's attribute type


class Subject:
    """A subject as DER, read as an x509.Name only when a rule needs more than the bytes.

    Most requests need nothing but the bytes; building Python objects for
    every name would cost each of them more than all the rules together.
    """

    __slots__ = ("_load", "_name", "der")

    def __init__(self, der: bytes, load: Callable[[], x509.Name] | x509.Name) -> None:
        self.der = der
        self._name = load if isinstance(load, x509.Name) else None
        self._load = None if isinstance(load, x509.Name) else load

    @classmethod
    def of(cls, name: x509.Name) -> Subject:
        return cls(name.public_bytes(), name)

    @property
    def name(self) -> x509.Name:
        if self._name is None:
            assert self._load is not None  # noqa: S101 - one of the two is always set
            self._name = self._load()
        return self._name

    def has_several_common_names(self) -> bool:
        # Every CN puts its attribute type in the DER: at most one occurrence
        # means at most one CN, and only more need a closer look.
        if self.der.count(_CN_TYPE) <= 1:
            return False
        return len(self.name.get_attributes_for_oid(NameOID.COMMON_NAME)) > 1


class Authorizer:
    """The enrollment rules of one service (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        policy: Policy,
        profiles: Mapping[str, Profile],
        issuers: Sequence[bytes],
        clock: Callable[[], float] = time.time,
    ) -> None:
        if policy.default_profile not in profiles:
            raise ValueError(f"no profile named {policy.default_profile}")
        self._ledger = ledger
        self._policy = policy
        self._profiles = dict(profiles)
        # The CA that issues now first; retired CAs follow, so that their
        # certificates can still renew.
        self._issuers = [x509.load_der_x509_certificate(der) for der in issuers]
        self._issuer_names = [ca.subject.public_bytes() for ca in self._issuers]
        self._static_sha256 = (hashlib.sha256(policy.static_challenge).digest()
                               if policy.static_challenge else b"")
        self._clock = clock

    # ---- 1. the reply must be deliverable -----------------------------------

    @staticmethod
    def check_deliverable(signer: Signer) -> None:
        """BadAlg unless a SUCCESS could be encrypted to the signer's key."""
        if signer.cert is None:
            raise BadMessageCheck("the signer certificate cannot be read")
        if not isinstance(signer.cert.public_key(), rsa.RSAPublicKey):
            raise BadAlg("replies are encrypted to RSA keys only; sign with an RSA key")

    def issued_by_us(self, signer: Signer) -> bool:
        """Whether the signer certificate names one of our CAs as its issuer."""
        cert = signer.cert
        # The issuer's DER stands in the certificate's bytes: a cheap first look.
        return cert is not None and any(name in signer.der for name in self._issuer_names) \
            and any(cert.issuer == ca.subject for ca in self._issuers)

    # ---- the decision ----------------------------------------------------------

    def authorize(self, message_type: MessageType, csr: CsrInfo, csr_der: bytes,
                  signer: Signer, *, profile_name: str = "") -> Grant:
        """What this PKCSReq or RenewalReq may have; BadRequest (or BadAlg) if nothing.

        ``profile_name``: the profile an external validator chose instead of
        the one the challenge grants (every other rule applies to it alike);
        a renewal keeps its certificate's profile and may not take another.
        """
        self.check_deliverable(signer)
        renews = self._renewed_certificate(signer)
        if renews is None and message_type is MessageType.RENEWAL_REQ:
            raise BadRequest("a RenewalReq must be signed by a valid certificate of this CA")
        subject = Subject(csr.subject_der, lambda: _csr_subject(csr_der))
        challenge: _Presented | None
        if renews is not None:
            profile = self._renewal_profile(renews)
            challenge = None
            if profile_name and profile_name != profile.name:
                raise BadRequest("a renewal keeps the profile of the certificate it renews")
        else:
            if self._policy.challenge_by_validators:
                profile, challenge = self._profiles[self._policy.default_profile], None
            else:
                profile, challenge = self._challenge_profile(csr.challenge)
            if profile_name:
                if profile_name not in self._profiles:
                    raise BadRequest("the validator chose a profile that does not exist")
                profile = self._profiles[profile_name]
        try:
            profile.check_key(csr.key_type, csr.key_bits, csr.curve)
            if renews is not None:
                subject, san_der, sans = self._renewal_names(profile, renews, subject,
                                                             csr.san_der)
            else:
                subject, san_der, sans = self._first_names(profile, subject, csr.san_der)
        except ProfileViolation as e:
            raise BadRequest(str(e)) from None
        if challenge is not None:
            self._check_bound_names(challenge, subject, san_der)
        if subject.der == EMPTY_NAME and not san_der:
            raise BadRequest("the request names neither a subject nor a subjectAltName")
        return Grant(
            profile=profile,
            subject=subject,
            san_der=san_der,
            sans=sans,
            challenge=challenge.digest if challenge is not None and not challenge.static
            else None,
            renews=renews,
            needs_approval=profile.require_approval and renews is None,
        )

    def approved(self, pending: PendingRequest, csr: x509.CertificateSigningRequest) -> Grant:
        """The grant of a pending request an operator approved.

        Its challenge was checked (and spent) when it was recorded; the names
        are those the profile gave it then, derived again from its CSR.
        """
        profile = self._profiles.get(pending.profile)
        if profile is None:
            raise BadRequest("the profile of the request no longer exists")
        try:
            subject, san_der, sans = self._first_names(profile, Subject.of(csr.subject),
                                                       _san_of(csr))
        except ProfileViolation as e:
            raise BadRequest(str(e)) from None
        return Grant(profile=profile, subject=subject, san_der=san_der, sans=sans,
                     challenge=None, renews=None, needs_approval=False)

    # ---- 2. renewals -------------------------------------------------------------

    def _renewed_certificate(self, signer: Signer) -> CertRecord | None:
        """The record of the certificate that signed the request, if one of our CAs issued it.

        None for a signer no CA of ours issued (the usual self-signed one).
        A certificate that verifies under one of our CAs but fails a check
        is refused outright.
        """
        if not self.issued_by_us(signer):
            return None
        cert = signer.cert
        assert cert is not None  # noqa: S101 - issued_by_us saw it
        for ca in self._issuers:
            if cert.issuer != ca.subject:
                continue
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise BadRequest("the signing certificate is not valid now")
            record = self._ledger.get(cert.serial_number)
            if record is None or record.der != signer.der:
                raise BadRequest("the signing certificate is not on record")
            if not good_at(record, self._clock()):
                raise BadRequest("the signing certificate is revoked")
            return record
        return None

    def _renewal_profile(self, old: CertRecord) -> Profile:
        window = self._policy.renewal_window_days
        if window and old.not_after - self._clock() > window * 86400:
            raise BadRequest(f"renewal opens {window} days before the certificate expires")
        profile = self._profiles.get(old.profile)
        if profile is None:
            raise BadRequest("the profile of the certificate being renewed no longer exists")
        return profile

    @staticmethod
    def _renewal_names(profile: Profile, old: CertRecord, subject: Subject,
                       san_der: bytes) -> tuple[Subject, bytes, tuple[str, ...]]:
        old_cert = x509.load_der_x509_certificate(old.der)
        old_subject = old_cert.subject.public_bytes()
        asked = subject.name.public_bytes()
        if asked != old_subject and not (
                profile.subject_template
                and profile.render_subject(common_name(asked)).public_bytes() == old_subject):
            raise BadRequest("a renewal keeps the subject of the certificate it renews")
        old_names = {n.dump() for n in general_names(_san_of(old_cert))}
        asked_names = [n.dump() for n in general_names(san_der)]
        if not set(asked_names) <= old_names:
            raise BadRequest("a renewal may not add subjectAltNames")
        new_der, sans = profile.filter_san(san_der)
        if {n.dump() for n in general_names(new_der)} != old_names \
                and not profile.renewal_may_drop_sans:
            raise BadRequest("a renewal keeps the subjectAltNames of the certificate it renews")
        return Subject(old_subject, old_cert.subject), new_der, sans

    # ---- 3. challenges ------------------------------------------------------------

    def _challenge_profile(self, presented: bytes) -> tuple[Profile, _Presented]:
        """The profile a challenge password grants, or BadRequest."""
        digest = hashlib.sha256(presented).digest()
        # Compared as digests in constant time, so neither the content nor
        # the length of the secret leaks through timing.
        if self._static_sha256 and hmac.compare_digest(digest, self._static_sha256):
            return self._profiles[self._policy.default_profile], _Presented(digest, static=True)
        challenge = self._ledger.get_challenge(digest) if presented else None
        if challenge is None:
            raise BadRequest("challenge password is wrong or missing")
        if not usable(challenge, self._clock()):
            raise BadRequest("challenge password expired or used up")
        profile = self._profiles.get(challenge.profile)
        if profile is None:
            raise BadRequest("the challenge names a profile that no longer exists")
        return profile, _Presented(digest, static=False, subject_pattern=challenge.subject_pattern,
                                   san_pattern=challenge.san_pattern,
                                   binds=challenge.binds_names)

    # ---- 4. a first enrollment's names --------------------------------------------

    @staticmethod
    def _first_names(profile: Profile, subject: Subject,
                     san_der: bytes) -> tuple[Subject, bytes, tuple[str, ...]]:
        if subject.has_several_common_names() and not profile.allow_multiple_cn:
            raise BadRequest("a subject may have one common name only")
        new_san, sans = profile.filter_san(san_der)
        if profile.subject_template:
            cns = subject.name.get_attributes_for_oid(NameOID.COMMON_NAME)
            cn = str(cns[-1].value) if cns else ""
            return Subject.of(profile.render_subject(cn)), new_san, sans
        return subject, new_san, sans

    # ---- 6. names a challenge binds ------------------------------------------------

    @staticmethod
    def _check_bound_names(challenge: _Presented, subject: Subject, san_der: bytes) -> None:
        if not challenge.binds:
            return
        if re.fullmatch(challenge.subject_pattern, subject.name.rfc4514_string()) is None:
            raise BadRequest("this challenge may not be used for this subject")
        for name in general_names(san_der):
            try:
                value = san_value(name)
            except ValueError:
                raise BadRequest("the subjectAltName is not valid") from None
            if re.fullmatch(challenge.san_pattern, value) is None:
                raise BadRequest("this challenge may not be used for these subjectAltNames")


@dataclass(frozen=True, slots=True)
class _Presented:
    """A challenge that matched: what spends it and what names it binds."""

    digest: bytes
    static: bool
    subject_pattern: str = ""
    san_pattern: str = ""
    binds: bool = False


def _csr_subject(csr_der: bytes) -> x509.Name:
    try:
        return x509.load_der_x509_csr(csr_der).subject
    except Exception:  # noqa: BLE001 - any parser error is the request's fault
        raise BadRequest("the certification request's subject cannot be read") from None


def _san_of(signed: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    """The subjectAltName value of a certificate or CSR, "" when it has none."""
    try:
        return signed.extensions.get_extension_for_class(x509.SubjectAlternativeName) \
            .value.public_bytes()
    except x509.ExtensionNotFound:
        return b""
