"""The enrollment rules: from a batch of pkiMessages to a batch of answers.

Plain synchronous code, run by the runtime in worker threads, in two stages
per batch. ``prepare_batch``: one native unwrap call, one synced write for
the one-time challenges the batch uses, one native issue call and one wrap
call, which signs each reply as if its certificate were already recorded.
``finish_batch``: one ledger commit (synced to disk), after which the
answers may leave; the rare message whose commit turned out otherwise (a
concurrent resend, a transactionID conflict) is signed again. The runtime
prepares the next batch while this one's commit waits for the disk. No
certificate is handed back unless the commit that records it has returned.

Every answer is either a signed CertRep (HTTP 200: SUCCESS, PENDING, or
FAILURE with a failInfo) for a message we could authenticate, or a
RequestError (plain HTTP 4xx) for one we could not parse, verify or decrypt.

Who may have a certificate (RFC 8894 section 2.3):
- a PKCSReq whose challenge password is the static shared secret, or a
  one-time challenge minted by an operator or MDM (bound to a profile, an
  expiry, a number of uses and optionally a subject pattern);
- a RenewalReq, or a PKCSReq signed by a valid, unrevoked certificate we
  issued (Cisco and macOS renew that way): no challenge needed.
A profile may require manual approval: the request is recorded as pending
and answered PENDING until an operator decides.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from asn1crypto import cms as asn1_cms
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec

from scep_fast.crypto import (
    AlgorithmRefused,
    Algorithms,
    CertRepSpec,
    CsrInvalid,
    DecryptFailed,
    IssueRequest,
    NativeError,
    ScepContext,
    Unwrapped,
)
from scep_fast.protocol import (
    BadAlg,
    BadCertId,
    BadMessageCheck,
    BadRequest,
    FailInfo,
    InternalError,
    MalformedRequest,
    MessageError,
    MessageType,
    PKIStatus,
    ScepError,
    ScepRequestMessage,
    from_raw_attributes,
)
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    Challenge,
    Ledger,
    LedgerError,
    NotFound,
    PendingRequest,
    Recorded,
    SerialCollision,
    TransactionConflict,
)
from scep_fast.service.profile import Profile, ProfileViolation, common_name

_EMPTY_NAME = b"\x30\x00"
# Messages that name a transaction the ledger may already know.
_TRANSACTION_TYPES = frozenset({MessageType.PKCS_REQ, MessageType.RENEWAL_REQ,
                                MessageType.CERT_POLL})
SUPERSEDED = 4  # RFC 5280 CRLReason


@dataclass(frozen=True, slots=True)
class Policy:
    """Who may enroll, and how renewals go."""

    # The static shared secret; empty: only one-time challenges and renewals.
    static_challenge: bytes = b""
    default_profile: str = "default"
    # Renewal only this close to the old certificate's expiry; 0: any time.
    renewal_window_days: int = 0
    revoke_on_replace: bool = False


@dataclass(slots=True)
class Answer:
    """What the runtime sends back for one message, and what it logs."""

    body: bytes = b""                      # a CertRep, when error is None
    error: ScepError | None = None         # a plain HTTP answer instead
    message_type: str = "-"
    transaction_id: str = "-"
    status: str = "-"                      # SUCCESS, FAILURE, PENDING, or the HTTP refusal
    fail_info: str = "-"
    serial: int | None = None
    reason: str = ""                       # for the log: why, never a secret


@dataclass(slots=True)
class _Item:
    """One message on its way through the batch."""

    unwrapped: Unwrapped
    answer: Answer
    request: ScepRequestMessage | None = None
    reply: CertRepSpec | None = None
    profile: Profile | None = None
    issue: IssueRequest | None = None
    pending: PendingRequest | None = None
    challenge: bytes = b""                 # digest of a one-time challenge to consume
    challenge_pattern: str = ""
    replaces: int | None = None            # serial of the certificate a renewal replaces
    subject_der: bytes = b""
    subject_text: str = ""                 # set when a profile template made the subject
    sans: tuple[str, ...] = ()
    csr_sha256: bytes = b""
    # Whose transaction this is (see EnrollmentService._requester).
    requester: bytes = b""
    signed_by_us: bool = False
    # What the ledger already holds for (transactionID, requester).
    known_record: CertRecord | None = None
    known_pending: PendingRequest | None = None
    # Issued, answered SUCCESS, and to be committed in finish_batch.
    record: CertRecord | None = None


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """A batch between its two stages: replies signed, certificates not yet recorded."""

    items: list[_Item]
    issued_at: float


# A serial number is the issuing millisecond above 96 random bits: well over
# the 64 bits of CSPRNG output RFC 5280 and the CA/Browser Forum ask for,
# positive, 18 octets in DER. The time on top makes each new serial sort after
# every earlier one (and after the 127-bit random serials of older versions),
# so the ledger's tree of records grows at its right edge: a batch's commit
# rewrites a few adjacent pages instead of one page per record scattered over
# the whole file, which is what made commits slow on a large ledger.
SERIAL_RANDOM_BITS = 96


def _new_serial(now: float) -> int:
    return (int(now * 1000) << SERIAL_RANDOM_BITS) | secrets.randbits(SERIAL_RANDOM_BITS)


class EnrollmentService:
    """Request handling for one worker: keys in the native context, records in the ledger."""

    def __init__(
        self,
        ctx: ScepContext,
        ledger: Ledger,
        policy: Policy,
        profiles: Mapping[str, Profile],
        issuers: Sequence[bytes],
        *,
        crl_source: Callable[[bytes], bytes | None] = lambda _issuer: None,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[float, int], None] = lambda _seconds, _issued: None,
    ) -> None:
        if policy.default_profile not in profiles:
            raise ValueError(f"no profile named {policy.default_profile}")
        self._ctx = ctx
        # The native context serves one call at a time: prepare_batch holds it
        # throughout, finish_batch only to sign a reply again.
        self._native = threading.Lock()
        self._ledger = ledger
        self._policy = policy
        self._profiles = dict(profiles)
        # The CA that issues now comes first; retired CAs follow, so that
        # their certificates can still renew and be looked up.
        self._issuers = [x509.load_der_x509_certificate(der) for der in issuers]
        self._ca_cert = issuers[0]
        self._static_sha256 = (hashlib.sha256(policy.static_challenge).digest()
                               if policy.static_challenge else b"")
        self._crl_source = crl_source
        self._clock = clock
        # Told how long each ledger commit took and how many certificates it
        # recorded (the runtime turns that into metrics).
        self._on_commit = on_commit

    # ---- the batch ------------------------------------------------------

    def handle_batch(self, messages: Sequence[bytes]) -> list[Answer]:
        """Both stages at once."""
        return self.finish_batch(self.prepare_batch(messages))

    def prepare_batch(self, messages: Sequence[bytes]) -> PreparedBatch:
        with self._native:
            items = [_Item(u, Answer()) for u in self._ctx.unwrap_batch(messages)]
            for item in items:
                self._authenticate(item)
            readable = [i for i in items if i.request is not None and i.reply is None]
            self._look_up([i for i in readable if i.request is not None
                           and i.request.message_type in _TRANSACTION_TYPES])
            for item in readable:
                self._decide(item)
            self._consume_challenges([i for i in items if i.challenge])
            self._record_pending([i for i in items if i.pending is not None])
            issued_at = self._clock()
            self._issue([i for i in items if i.issue is not None], issued_at)
            self._wrap([i for i in items if i.reply is not None])
        return PreparedBatch(items, issued_at)

    def finish_batch(self, batch: PreparedBatch) -> list[Answer]:
        """Records the batch's certificates; only then are its answers final."""
        self._commit([i for i in batch.items if i.record is not None], batch.issued_at)
        return [item.answer for item in batch.items]

    # ---- operator decisions on pending requests -----------------------------

    def approve(self, request_id: str) -> CertRecord:
        """Issues and records the certificate of a pending request.

        The device receives it at its next CertPoll (or resend) of the same
        transaction. Raises NotFound, or LedgerError if already decided.
        """
        pending = self._ledger.get_pending(request_id)
        if pending is None:
            raise NotFound(f"no pending request {request_id}")
        if pending.status != "pending":
            raise LedgerError(f"request {request_id} is already {pending.status}")
        profile = self._profiles.get(pending.profile) or \
            self._profiles[self._policy.default_profile]
        csr = x509.load_der_x509_csr(pending.csr_der)
        key_type = "EC" if isinstance(csr.public_key(), ec.EllipticCurvePublicKey) else "RSA"
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            san_der, _ = profile.filter_san(san.value.public_bytes())
        except x509.ExtensionNotFound:
            san_der = b""
        subject_der = b""
        if profile.subject_template:
            cn = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            subject_der = profile.render_subject(str(cn[-1].value) if cn else "").public_bytes()
        now = self._clock()
        not_before, not_after = profile.validity(int(now))
        issue = IssueRequest(serial=_new_serial(now), not_before=not_before, not_after=not_after,
                             csr_der=pending.csr_der, subject_der=subject_der,
                             extensions_der=profile.extensions_der(key_type, san_der))
        with self._native:
            der = self._ctx.issue(issue)
        record = CertRecord(
            serial=issue.serial, der=der,
            subject=x509.load_der_x509_certificate(der).subject.rfc4514_string(),
            sans=pending.sans, not_before=not_before, not_after=not_after, issued_at=now,
            transaction_id=pending.transaction_id,
            requester_key_sha256=pending.requester_key_sha256,
            csr_sha256=pending.csr_sha256, profile=profile.name)
        outcome = self._ledger.commit([record])[0]
        if not isinstance(outcome, Recorded | AlreadyIssued):
            raise LedgerError(f"request {request_id} could not be recorded: {outcome}")
        self._ledger.decide_pending(request_id, "approved", now)
        return outcome.record

    def reject(self, request_id: str, reason: str = "") -> PendingRequest:
        """Refuses a pending request: its next poll gets FAILURE badRequest."""
        return self._ledger.decide_pending(request_id, "rejected", self._clock(), reason)

    # ---- step 1: authenticate and decide ----------------------------------

    def _authenticate(self, item: _Item) -> None:
        """Verified attributes in ``item.request``, or a refusal already decided."""
        u = item.unwrapped
        error = u.error
        # What failed before the signature was verified, or what we cannot
        # decrypt, gets no signed reply: nothing tells us whom we would answer.
        if error is not None and not isinstance(error, AlgorithmRefused | CsrInvalid):
            kind = "cannot decrypt the message" if isinstance(error, DecryptFailed) else (
                "message does not verify")
            self._refuse(item, MalformedRequest(f"{kind}: {error.reason}"))
            return
        algorithms = u.algorithms
        if isinstance(error, AlgorithmRefused):
            # The core stopped at the refused algorithm; the ones it did not
            # reach are unknown, and the refusal below says which one failed.
            algorithms = Algorithms(digest=algorithms.digest or "sha256",
                                    cipher=algorithms.cipher or "aes-128-cbc",
                                    key_transport=algorithms.key_transport or "rsa-pkcs1-v1_5")
        try:
            request = from_raw_attributes(
                u.message_type,
                u.transaction_id,
                u.sender_nonce,
                digest_algorithm=algorithms.digest or "unknown",
                content_cipher=algorithms.cipher or "unknown",
                key_transport=algorithms.key_transport or "unknown",
            )
        except BadAlg as e:
            if not u.authenticated:
                self._refuse(item, MalformedRequest(str(e)))
                return
            item.answer.transaction_id = u.transaction_id.decode("ascii", "replace")
            self._fail(item, e)
            return
        except MalformedRequest as e:
            self._refuse(item, e)
            return
        item.request = request
        item.signed_by_us, item.requester = self._requester(u.signer_cert, u.signer_key_sha256)
        item.answer.message_type = request.message_type.name
        item.answer.transaction_id = request.transaction_id

    def _decide(self, item: _Item) -> None:
        request, error = item.request, item.unwrapped.error
        assert request is not None  # noqa: S101 - only authenticated items get here
        try:
            if isinstance(error, AlgorithmRefused):
                raise BadAlg(error.reason)
            if isinstance(error, CsrInvalid):
                raise BadRequest(f"malformed certification request: {error.reason}")
            message_type = request.message_type
            if message_type in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
                self._check_enrollment(item, request)
            elif message_type is MessageType.CERT_POLL:
                self._answer_poll(item)
            elif message_type is MessageType.GET_CERT:
                self._answer_get_cert(item)
            elif message_type is MessageType.GET_CRL:
                self._answer_get_crl(item)
            else:
                raise BadRequest(f"{message_type.name} is not a request")
        except MessageError as e:
            self._fail(item, e)

    def _look_up(self, items: list[_Item]) -> None:
        """What the ledger knows of each transaction, in one read for the batch."""
        keys = [(i.request.transaction_id, i.requester) for i in items if i.request is not None]
        for item, (record, pending) in zip(items, self._ledger.find_transactions(keys),
                                           strict=True):
            item.known_record, item.known_pending = record, pending

    def _check_enrollment(self, item: _Item, request: ScepRequestMessage) -> None:
        u = item.unwrapped
        csr = u.csr
        if csr is None:
            raise BadRequest(f"{request.message_type.name} without a certification request")
        item.csr_sha256 = hashlib.sha256(u.content).digest()
        if self._answer_known(item):
            return
        renewed = self._renewed_certificate(u.signer_cert) if item.signed_by_us else None
        if renewed is not None:
            profile = self._renewal_profile(item, renewed)
        elif request.message_type is MessageType.RENEWAL_REQ:
            raise BadRequest("RenewalReq must be signed by a valid certificate of this CA")
        else:
            profile = self._authorise(item, csr.challenge)
        try:
            profile.check_key(csr.key_type, csr.key_bits, csr.curve)
            san_der, sans = profile.filter_san(csr.san_der)
            subject_der = csr.subject_der
            if profile.subject_template:
                rendered = profile.render_subject(common_name(csr.subject_der))
                subject_der = rendered.public_bytes()
                item.subject_text = rendered.rfc4514_string()
        except ProfileViolation as e:
            raise BadRequest(str(e)) from None
        if subject_der == _EMPTY_NAME and not san_der:
            raise BadRequest("the request names neither a subject nor a subjectAltName")
        if item.challenge_pattern:
            self._check_bound_names(item.challenge_pattern, subject_der, sans)
        item.profile = profile
        item.subject_der = subject_der
        item.sans = sans
        now = self._clock()
        if profile.require_approval and renewed is None:
            item.pending = PendingRequest(
                request_id=secrets.token_hex(8),
                transaction_id=request.transaction_id,
                requester_key_sha256=item.requester,
                csr_sha256=item.csr_sha256,
                csr_der=u.content,
                subject=item.subject_text
                or x509.load_der_x509_csr(u.content).subject.rfc4514_string(),
                sans=sans,
                profile=profile.name,
                received_at=now,
            )
            return
        not_before, not_after = profile.validity(int(now))
        item.issue = IssueRequest(
            serial=_new_serial(now),
            not_before=not_before,
            not_after=not_after,
            request=u,
            subject_der=b"" if subject_der == csr.subject_der else subject_der,
            extensions_der=profile.extensions_der(csr.key_type, san_der),
        )

    def _answer_known(self, item: _Item) -> bool:
        """Answers a transaction the ledger knows: its certificate, PENDING, or a refusal.

        A message that carries a CSR must carry the same one: RFC 8894
        section 3.3.1 makes the same transactionID a resend, and another CSR
        under it is not. Returns False for a transaction not seen before.
        """
        existing, pending = item.known_record, item.known_pending
        known_csr = existing.csr_sha256 if existing is not None else (
            pending.csr_sha256 if pending is not None else None)
        if known_csr is None:
            return False
        if item.csr_sha256 and known_csr != item.csr_sha256:
            raise BadRequest("transactionID already used with another certification request")
        if existing is not None:
            self._succeed(item, existing.der, existing.serial, existing.profile)
        elif pending is not None:
            self._answer_pending(item, pending)
        return True

    def _answer_pending(self, item: _Item, pending: PendingRequest) -> None:
        if pending.status == "rejected":
            raise BadRequest(f"request rejected{': ' + pending.reason if pending.reason else ''}")
        # Approved requests are issued by the approval itself; until the
        # certificate is on record the answer stays PENDING.
        self._pend(item, pending.request_id)

    def _authorise(self, item: _Item, presented: bytes) -> Profile:
        """The profile a challenge password grants, or BadRequest."""
        digest = hashlib.sha256(presented).digest()
        # Compared as digests in constant time, so neither the content nor
        # the length of the secret leaks through timing.
        if self._static_sha256 and hmac.compare_digest(digest, self._static_sha256):
            return self._profiles[self._policy.default_profile]
        challenge = self._ledger.get_challenge(digest) if presented else None
        if challenge is None:
            raise BadRequest("challenge password is wrong or missing")
        if not self._usable(challenge):
            raise BadRequest("challenge password expired or used up")
        profile = self._profiles.get(challenge.profile)
        if profile is None:
            raise BadRequest(f"challenge names an unknown profile {challenge.profile}")
        item.challenge = digest
        item.challenge_pattern = challenge.subject_pattern
        return profile

    def _usable(self, challenge: Challenge) -> bool:
        return challenge.uses_left > 0 and challenge.expires_at > self._clock()

    @staticmethod
    def _check_bound_names(pattern: str, subject_der: bytes, sans: tuple[str, ...]) -> None:
        """A one-time challenge may be used only for names matching its pattern."""
        names = [common_name(subject_der)] + [s.partition(":")[2] for s in sans]
        for name in names:
            if name and re.fullmatch(pattern, name) is None:
                raise BadRequest(f"this challenge may not be used for {name!r}")

    def _requester(self, signer_der: bytes, signer_key_sha256: bytes) -> tuple[bool, bytes]:
        """Whether one of our CAs' names signs, and the identity transactions are keyed on.

        A device's transactions are keyed on (transactionID, requester)
        (RFC 8894 section 3.2.1.1: the transactionID is unique per requester,
        and clients derive it from their key). The requester is the signer's
        key for a first enrollment; for a message signed by a certificate we
        issued, it is that certificate, so that a device renewing with the same
        key and transactionID (micromdm's scepclient does) starts a new
        transaction with each certificate instead of replaying the first.
        """
        try:
            signer = x509.load_der_x509_certificate(signer_der)
        except ValueError:
            return False, signer_key_sha256
        if any(signer.issuer == ca.subject for ca in self._issuers):
            return True, hashlib.sha256(signer_der).digest()
        return False, signer_key_sha256

    def _renewed_certificate(self, signer_der: bytes) -> CertRecord | None:
        """The record of the certificate that signed the request, if we issued it.

        None for the usual self-signed signer. A certificate that names one
        of our CAs as issuer but fails a check is refused outright: a device
        presenting a revoked or expired certificate must not fall back to a
        challenge that someone else may know.
        """
        try:
            signer = x509.load_der_x509_certificate(signer_der)
        except ValueError:
            return None
        for ca in self._issuers:
            if signer.issuer != ca.subject:
                continue
            try:
                signer.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
            if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
                raise BadRequest("the signing certificate is not valid now")
            record = self._ledger.get(signer.serial_number)
            if record is None or record.der != signer_der:
                raise BadRequest("the signing certificate is not on record")
            if record.status != "issued":
                raise BadRequest("the signing certificate is revoked")
            return record
        return None

    def _renewal_profile(self, item: _Item, old: CertRecord) -> Profile:
        window = self._policy.renewal_window_days
        if window and old.not_after - self._clock() > window * 86400:
            raise BadRequest(f"renewal opens {window} days before the certificate expires")
        item.replaces = old.serial
        return self._profiles.get(old.profile) or self._profiles[self._policy.default_profile]

    def _answer_poll(self, item: _Item) -> None:
        # RFC 8894 section 3.3.3: CertPoll asks about a transaction by its
        # transactionID, from the same requester.
        if not self._answer_known(item):
            raise BadCertId("no request with this transactionID")

    def _issuer_and_serial(self, item: _Item) -> tuple[bytes, int]:
        try:
            parsed = asn1_cms.IssuerAndSerialNumber.load(item.unwrapped.content)
            return bytes(parsed["issuer"].dump()), int(parsed["serial_number"].native)
        except (ValueError, TypeError, KeyError):
            raise BadRequest("content is not an IssuerAndSerialNumber") from None

    def _answer_get_cert(self, item: _Item) -> None:
        # RFC 8894 section 3.3.4: a certificate by issuer and serial number.
        issuer, serial = self._issuer_and_serial(item)
        record = self._ledger.get(serial) if serial > 0 else None
        if record is None or x509.load_der_x509_certificate(record.der).issuer.public_bytes() \
                != issuer:
            raise BadCertId("no certificate with this issuer and serial number")
        self._succeed(item, record.der, record.serial, record.profile, chain=False)

    def _answer_get_crl(self, item: _Item) -> None:
        # RFC 8894 section 3.3.5: the CRL of the issuer of the named certificate.
        issuer, _serial = self._issuer_and_serial(item)
        crl = self._crl_source(issuer)
        if crl is None:
            raise BadCertId("no CRL for this issuer")
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.SUCCESS, crls=(crl,))
        item.answer.status = "SUCCESS"

    # ---- step 2: challenges and pending requests ----------------------------

    def _consume_challenges(self, items: list[_Item]) -> None:
        if not items:
            return
        # One synced write for the batch: the use count holds across every
        # worker process, so a single-use challenge gives one certificate.
        try:
            taken = self._ledger.consume_challenges([i.challenge for i in items], self._clock())
        except Exception as e:  # noqa: BLE001 - refuse rather than issue unchecked
            for item in items:
                self._internal(item, f"challenge store: {e}")
            return
        for item, challenge in zip(items, taken, strict=True):
            if challenge is None:
                self._fail(item, BadRequest("challenge password expired or used up"))

    def _record_pending(self, items: list[_Item]) -> None:
        for item in items:
            if item.pending is None:  # refused in the meantime
                continue
            try:
                stored = self._ledger.add_pending(item.pending)
            except Exception as e:  # noqa: BLE001
                self._internal(item, f"pending store: {e}")
                continue
            if stored.csr_sha256 != item.csr_sha256:
                self._fail(item, BadRequest(
                    "transactionID already used with another certification request"))
            else:
                self._answer_pending(item, stored)

    # ---- step 3: issue and record -----------------------------------------

    def _issue(self, items: list[_Item], now: float) -> None:
        """Issues, and answers SUCCESS until the commit says otherwise."""
        items = [i for i in items if i.issue is not None]
        if not items:
            return
        issued = self._ctx.issue_batch([i.issue for i in items if i.issue is not None])
        for item, result in zip(items, issued, strict=True):
            item.issue, issue = None, item.issue
            if issue is None:
                continue
            if isinstance(result, CsrInvalid):
                self._fail(item, BadMessageCheck(f"certification request: {result.reason}"))
                continue
            if isinstance(result, NativeError):
                self._internal(item, f"issue: {result.reason}")
                continue
            record = self._record(item, issue, result, now)
            self._succeed(item, record.der, record.serial, record.profile)
            item.record = record

    def _commit(self, items: list[_Item], now: float) -> None:
        if not items:
            return
        records = [i.record for i in items if i.record is not None]
        started = time.perf_counter()
        try:
            outcomes = self._ledger.commit(records)
        except Exception as e:  # noqa: BLE001 - nothing of this batch may leave
            for item in items:
                self._internal(item, f"ledger commit: {e}")
            return
        self._on_commit(time.perf_counter() - started,
                        sum(isinstance(o, Recorded) for o in outcomes))
        sign_again: list[_Item] = []
        for item, outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Recorded):
                self._replace(item, now)
            elif isinstance(outcome, AlreadyIssued):
                # A resend recorded by another batch since this one looked.
                record = outcome.record
                self._succeed(item, record.der, record.serial, record.profile)
                sign_again.append(item)
            elif isinstance(outcome, TransactionConflict):
                self._fail(item, BadRequest(
                    "transactionID already used with another certification request"))
                sign_again.append(item)
            elif isinstance(outcome, SerialCollision):
                self._internal(item, f"serial {outcome.serial:x} collided")
        if sign_again:
            with self._native:
                self._wrap(sign_again)

    def _replace(self, item: _Item, now: float) -> None:
        if item.replaces is None or not self._policy.revoke_on_replace:
            return
        try:
            self._ledger.revoke(item.replaces, SUPERSEDED, now)
        except Exception as e:  # noqa: BLE001 - the new certificate stands regardless
            item.answer.reason = f"revoke-on-replace of {item.replaces:x} failed: {e}"

    def _record(self, item: _Item, issue: IssueRequest, der: bytes, now: float) -> CertRecord:
        u = item.unwrapped
        assert item.profile is not None  # noqa: S101 - set with the issue request
        return CertRecord(
            serial=issue.serial,
            der=der,
            subject=x509.load_der_x509_certificate(der).subject.rfc4514_string(),
            sans=item.sans,
            not_before=issue.not_before,
            not_after=issue.not_after,
            issued_at=now,
            transaction_id=u.transaction_id.decode("ascii"),
            requester_key_sha256=item.requester,
            csr_sha256=item.csr_sha256,
            profile=item.profile.name,
        )

    # ---- step 4: sign the replies -------------------------------------------

    def _wrap(self, items: list[_Item]) -> None:
        items = [i for i in items if i.reply is not None]
        if not items:
            return
        results = self._ctx.wrap_batch([i.reply for i in items if i.reply is not None])
        for item, result in zip(items, results, strict=True):
            if isinstance(result, NativeError):
                self._internal(item, f"wrap: {result.reason}")
            else:
                item.answer.body = result

    # ---- outcomes -------------------------------------------------------------

    def _succeed(self, item: _Item, cert: bytes, serial: int, profile_name: str, *,
                 chain: bool = True) -> None:
        profile = self._profiles.get(profile_name)
        with_chain = chain and profile is not None and profile.include_chain
        certs = (cert, self._ca_cert) if with_chain else (cert,)
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.SUCCESS, certs=certs)
        item.answer.status = "SUCCESS"
        item.answer.serial = serial

    def _pend(self, item: _Item, request_id: str) -> None:
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.PENDING)
        item.answer.status = "PENDING"
        item.answer.reason = f"pending request {request_id}"

    def _fail(self, item: _Item, error: MessageError) -> None:
        fail_info = error.fail_info if error.fail_info is not None else FailInfo.BAD_REQUEST
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.FAILURE,
                                 fail_info=fail_info, fail_info_text=error.reason or "")
        item.issue = None
        item.pending = None
        item.answer.serial = None
        item.answer.status = "FAILURE"
        item.answer.fail_info = FailInfo(fail_info).name
        item.answer.reason = error.reason or ""

    def _refuse(self, item: _Item, error: ScepError) -> None:
        item.reply = None
        item.answer.body = b""  # a reply signed before the refusal never leaves
        item.answer.serial = None
        item.issue = None
        item.pending = None
        item.answer.error = error
        item.answer.status = f"HTTP {error.http_status}"
        item.answer.reason = error.reason or ""

    def _internal(self, item: _Item, detail: str) -> None:
        self._refuse(item, InternalError(detail))
        item.answer.reason = detail
