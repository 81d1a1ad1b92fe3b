"""The enrollment rules: from a batch of pkiMessages to a batch of answers.

Plain synchronous code, run by the runtime in a worker thread, one call per
batch: one native unwrap call, one issue call, one ledger commit (synced to
disk) and one wrap call for the whole batch. No certificate is handed back
unless the commit that records it has returned.

Every answer is either a signed CertRep (HTTP 200, SUCCESS or FAILURE with a
failInfo) for a message we could authenticate, or a RequestError (plain
HTTP 4xx) for one we could not parse, verify or decrypt.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cryptography import x509

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
    Ledger,
    Recorded,
    SerialCollision,
    TransactionConflict,
)
from scep_fast.service.profile import Profile, filter_san

# RFC 5480 section 2.1.1.1 curves we issue for; P-521 and others are refused.
ALLOWED_CURVES = frozenset({"prime256v1", "secp384r1"})
_EMPTY_NAME = b"\x30\x00"


@dataclass(frozen=True, slots=True)
class Policy:
    """What a request must satisfy to be issued a certificate."""

    challenge: bytes
    min_rsa_bits: int = 2048
    include_chain: bool = False

    def __post_init__(self) -> None:
        if not self.challenge:
            raise ValueError("a challenge password is required")


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
    issue: IssueRequest | None = None
    sans: tuple[str, ...] = ()
    csr_sha256: bytes = b""
    certs: list[bytes] = field(default_factory=list)


def _new_serial() -> int:
    # 127 random bits: positive, well over RFC 5280's 64 bits of entropy,
    # and 16 octets in DER.
    return secrets.randbits(127) | (1 << 64)


class EnrollmentService:
    """PKCSReq handling for one worker: keys in the native context, records in the ledger."""

    def __init__(
        self,
        ctx: ScepContext,
        ledger: Ledger,
        policy: Policy,
        profile: Profile,
        ca_cert: bytes,
        *,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[float, int], None] = lambda _seconds, _issued: None,
    ) -> None:
        self._ctx = ctx
        self._ledger = ledger
        self._policy = policy
        self._profile = profile
        self._chain = (ca_cert,) if policy.include_chain else ()
        self._challenge_sha256 = hashlib.sha256(policy.challenge).digest()
        self._clock = clock
        # Told how long each ledger commit took and how many certificates it
        # recorded (the runtime turns that into metrics).
        self._on_commit = on_commit

    # ---- the batch ------------------------------------------------------

    def handle_batch(self, messages: Sequence[bytes]) -> list[Answer]:
        items = [_Item(u, Answer()) for u in self._ctx.unwrap_batch(messages)]
        for item in items:
            self._check(item)
        self._issue([i for i in items if i.issue is not None])
        self._wrap([i for i in items if i.reply is not None])
        return [item.answer for item in items]

    # ---- step 1: authenticate and decide ----------------------------------

    def _check(self, item: _Item) -> None:
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
            # Authenticated but an algorithm we do not implement: answer
            # with the digest we can (the native core picks a safe one).
            self._fail_unparsed(item, e)
            return
        except MalformedRequest as e:
            self._refuse(item, e)
            return
        item.request = request
        item.answer.message_type = request.message_type.name
        item.answer.transaction_id = request.transaction_id
        try:
            if isinstance(error, AlgorithmRefused):
                raise BadAlg(error.reason)
            if isinstance(error, CsrInvalid):
                raise BadRequest(f"malformed certification request: {error.reason}")
            if request.message_type is MessageType.PKCS_REQ:
                self._check_pkcs_req(item)
            elif request.message_type is MessageType.CERT_POLL:
                self._answer_poll(item)
            else:
                raise BadRequest(f"{request.message_type.name} is not supported")
        except MessageError as e:
            self._fail(item, e)

    def _check_pkcs_req(self, item: _Item) -> None:
        u = item.unwrapped
        csr = u.csr
        if csr is None:
            raise BadRequest("PKCSReq without a certification request")
        # RFC 8894 section 2.3: the challenge password authorises enrollment.
        # Compared as digests in constant time, so neither its content nor its
        # length leaks through timing.
        presented = hashlib.sha256(csr.challenge).digest()
        if not hmac.compare_digest(presented, self._challenge_sha256):
            raise BadRequest("challenge password is wrong or missing")
        item.csr_sha256 = hashlib.sha256(u.content).digest()
        existing = self._ledger.find_transaction(u.transaction_id.decode("ascii"),
                                                 u.signer_key_sha256)
        if existing is not None:
            self._resend(item, existing)
            return
        self._check_key(csr.key_type, csr.key_bits, csr.curve)
        if csr.key_type not in ("RSA", "EC"):
            raise BadRequest(f"key type {csr.key_type} is not accepted")
        try:
            san_der, sans = filter_san(csr.san_der)
        except ValueError:
            raise BadRequest("subjectAltName does not parse") from None
        if csr.subject_der == _EMPTY_NAME and not san_der:
            raise BadRequest("the request names neither a subject nor a subjectAltName")
        not_before, not_after = self._profile.validity(int(self._clock()))
        item.sans = sans
        item.issue = IssueRequest(
            serial=_new_serial(),
            not_before=not_before,
            not_after=not_after,
            request=u,
            extensions_der=self._profile.extensions_der(csr.key_type, san_der),
        )

    def _check_key(self, key_type: str, bits: int, curve: str) -> None:
        if key_type == "RSA" and bits < self._policy.min_rsa_bits:
            raise BadRequest(f"RSA keys need at least {self._policy.min_rsa_bits} bits")
        if key_type == "EC" and curve not in ALLOWED_CURVES:
            raise BadRequest(f"curve {curve or 'unknown'} is not accepted (P-256, P-384)")

    def _resend(self, item: _Item, existing: CertRecord) -> None:
        """The same transaction again: the same certificate, or a refusal."""
        if existing.csr_sha256 != item.csr_sha256:
            raise BadRequest("transactionID already used with another certification request")
        self._succeed(item, existing.der, existing.serial)

    def _answer_poll(self, item: _Item) -> None:
        # RFC 8894 section 3.3.3: CertPoll asks about a transaction. Until
        # manual approval exists every request is decided at once, so a poll
        # finds its certificate or nothing.
        u = item.unwrapped
        existing = self._ledger.find_transaction(u.transaction_id.decode("ascii"),
                                                 u.signer_key_sha256)
        if existing is None:
            raise BadCertId("no request with this transactionID")
        self._succeed(item, existing.der, existing.serial)

    # ---- step 2: issue and record -----------------------------------------

    def _issue(self, items: list[_Item]) -> None:
        if not items:
            return
        issued = self._ctx.issue_batch([i.issue for i in items if i.issue is not None])
        now = self._clock()
        records: list[CertRecord] = []
        recorded_items: list[_Item] = []
        for item, result in zip(items, issued, strict=True):
            item.issue, issue = None, item.issue
            assert issue is not None  # noqa: S101 - selected above
            if isinstance(result, CsrInvalid):
                self._fail(item, BadMessageCheck(f"certification request: {result.reason}"))
                continue
            if isinstance(result, NativeError):
                self._internal(item, f"issue: {result.reason}")
                continue
            records.append(self._record(item, issue, result, now))
            recorded_items.append(item)
        if not records:
            return
        started = time.perf_counter()
        try:
            outcomes = self._ledger.commit(records)
        except Exception as e:  # noqa: BLE001 - nothing of this batch may leave
            for item in recorded_items:
                self._internal(item, f"ledger commit: {e}")
            return
        self._on_commit(time.perf_counter() - started,
                        sum(isinstance(o, Recorded) for o in outcomes))
        for item, outcome in zip(recorded_items, outcomes, strict=True):
            if isinstance(outcome, Recorded | AlreadyIssued):
                self._succeed(item, outcome.record.der, outcome.record.serial)
            elif isinstance(outcome, TransactionConflict):
                self._fail(item, BadRequest(
                    "transactionID already used with another certification request"))
            elif isinstance(outcome, SerialCollision):
                self._internal(item, f"serial {outcome.serial:x} collided")

    def _record(self, item: _Item, issue: IssueRequest, der: bytes, now: float) -> CertRecord:
        u = item.unwrapped
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        return CertRecord(
            serial=issue.serial,
            der=der,
            subject=subject,
            sans=item.sans,
            not_before=issue.not_before,
            not_after=issue.not_after,
            issued_at=now,
            transaction_id=u.transaction_id.decode("ascii"),
            requester_key_sha256=u.signer_key_sha256,
            csr_sha256=item.csr_sha256,
            profile=self._profile.name,
        )

    # ---- step 3: sign the replies -------------------------------------------

    def _wrap(self, items: list[_Item]) -> None:
        if not items:
            return
        results = self._ctx.wrap_batch([i.reply for i in items if i.reply is not None])
        for item, result in zip(items, results, strict=True):
            if isinstance(result, NativeError):
                self._internal(item, f"wrap: {result.reason}")
            else:
                item.answer.body = result

    # ---- outcomes -------------------------------------------------------------

    def _succeed(self, item: _Item, cert: bytes, serial: int) -> None:
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.SUCCESS,
                                 certs=(cert, *self._chain))
        item.answer.status = "SUCCESS"
        item.answer.serial = serial

    def _fail(self, item: _Item, error: MessageError) -> None:
        fail_info = error.fail_info if error.fail_info is not None else FailInfo.BAD_REQUEST
        item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.FAILURE,
                                 fail_info=fail_info, fail_info_text=error.reason or "")
        item.answer.status = "FAILURE"
        item.answer.fail_info = FailInfo(fail_info).name
        item.answer.reason = error.reason or ""

    def _fail_unparsed(self, item: _Item, error: MessageError) -> None:
        item.answer.transaction_id = item.unwrapped.transaction_id.decode("ascii", "replace")
        self._fail(item, error)

    def _refuse(self, item: _Item, error: ScepError) -> None:
        item.reply = None
        item.answer.error = error
        item.answer.status = f"HTTP {error.http_status}"
        item.answer.reason = error.reason or ""

    def _internal(self, item: _Item, detail: str) -> None:
        self._refuse(item, InternalError(detail))
        item.answer.reason = detail
