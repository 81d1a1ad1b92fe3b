"""The batch pipeline: from a batch of pkiMessages to a batch of answers.

Plain synchronous code, run by the runtime in worker threads, one stage at
a time, in the order they are written below:

1. ``authenticate_batch``: one native unwrap call; per message the
   authentication, a look at what the ledger knows of its transaction and
   the decision (``authorization.py`` holds every rule of who may have which
   certificate). A request the rules grant now waits for its certificate.
2. Validation (the runtime's, asynchronous): when validators are configured,
   each granted request is put to them (``PreparedBatch.validation_requests``)
   and their verdicts come back (``set_verdicts``).
3. ``issue_batch``: a request no validator allowed is refused (fail closed);
   pending requests are recorded; one native issue call.
4. ``sign_batch``: one wrap call, which signs each reply as if its
   certificate were already recorded.
5. ``record_batch``: one ledger commit (synced to disk) that records the
   certificates, spends the one-time challenges they were granted for and
   writes the notices of what happened to each enrollment (the outbox),
   after which the answers may leave; the rare message whose commit turned
   out otherwise (a concurrent resend, a transactionID conflict, a challenge
   spent meanwhile) is signed again.
6. Notification (the runtime's): the outbox delivers the notices.

The runtime authenticates the next batch while this one is validated or
recorded. No certificate is handed back unless the commit that records it
has returned.

Every answer is either a signed CertRep (HTTP 200: SUCCESS, PENDING, or
FAILURE with a failInfo) for a message we could authenticate, or a
RequestError (plain HTTP 4xx) for one we could not parse, verify or decrypt.
Whatever one message does, only its own answer changes: each step runs per
message, and an unexpected error in it refuses that message alone.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, TypeVar

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
    KeysUnavailable,
    MalformedRequest,
    MessageError,
    MessageType,
    PKIStatus,
    ScepError,
    ScepRequestMessage,
    StorageFull,
    StorageUnavailable,
    from_raw_attributes,
)
from scep_fast.service import approval, lookups
from scep_fast.service.authorization import Authorizer, Grant, Policy, Signer
from scep_fast.service.issuance import cert_record, issue_request
from scep_fast.service.ledger import (
    AlreadyIssued,
    CertRecord,
    ChallengeRefused,
    ChallengeUsedUp,
    Ledger,
    LedgerFull,
    LedgerUnavailable,
    PendingRequest,
    Recorded,
    Renewal,
    RenewedGone,
    SerialCollision,
    TransactionConflict,
    good_at,
)
from scep_fast.service.notices import (
    Notice,
    issued_event,
    notices_for,
    refused_event,
    revoked_event,
)
from scep_fast.service.profile import Profile
from scep_fast.service.validation import ValidationRequest, Verdict

__all__ = ["Answer", "EnrollmentService", "Policy", "PreparedBatch"]

log = logging.getLogger(__name__)
_In = TypeVar("_In")
_Out = TypeVar("_Out")

# Messages that name a transaction the ledger may already know.
_TRANSACTION_TYPES = frozenset({MessageType.PKCS_REQ, MessageType.RENEWAL_REQ,
                                MessageType.CERT_POLL})
SUPERSEDED = 4  # RFC 5280 CRLReason
_USED_UP = "challenge password expired or used up"
_CONFLICT = "transactionID already used with another certification request"
# The names RFC 8894 gives the enrollment messages, as validators see them.
_MESSAGE_TYPE_NAMES = {MessageType.PKCS_REQ: "PKCSReq", MessageType.RENEWAL_REQ: "RenewalReq"}
_ENROLLMENT_TYPES = frozenset(_MESSAGE_TYPE_NAMES)
# failInfo as RFC 8894 section 3.2.1.4 names it, for the notices.
_RFC_FAIL_INFO = {"BAD_ALG": "badAlg", "BAD_MESSAGE_CHECK": "badMessageCheck",
                  "BAD_REQUEST": "badRequest", "BAD_TIME": "badTime",
                  "BAD_CERT_ID": "badCertId"}
# A validator's reason goes to the device in the failInfoText: kept short and printable.
_MAX_VERDICT_REASON = 200


def _refused_by_validation(reason: str) -> str:
    text = "".join(c for c in reason if c.isprintable())[:_MAX_VERDICT_REASON]
    return f"refused by validation: {text}" if text else "refused by validation"


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
    signer: Signer | None = None
    # Whose transaction this is (see _requester).
    requester: bytes = b""
    reply: CertRepSpec | None = None
    grant: Grant | None = None
    issue: IssueRequest | None = None
    pending: PendingRequest | None = None
    csr_sha256: bytes = b""
    # What the ledger already holds for (transactionID, requester).
    known_record: CertRecord | None = None
    known_pending: PendingRequest | None = None
    # Issued, answered SUCCESS, and to be committed by record_batch.
    record: CertRecord | None = None
    # What the validators are asked, built while authenticating (where a
    # failure refuses this message only), and what they decided (an
    # exception: they could not decide).
    validation: ValidationRequest | None = None
    verdict: Verdict | BaseException | None = None

    @property
    def awaits_validation(self) -> bool:
        """Granted a new certificate (or a pending request), not yet validated."""
        return (self.grant is not None and self.request is not None
                and self.unwrapped.csr is not None
                and (self.issue is not None or self.pending is not None))

    def validation_request(self) -> ValidationRequest:
        """What validators are asked about this request (one that awaits validation)."""
        grant, request, csr = self.grant, self.request, self.unwrapped.csr
        if grant is None or request is None or csr is None:
            raise InternalError("a request that was not granted reached validation")
        return ValidationRequest(
            transaction_id=request.transaction_id,
            message_type=_MESSAGE_TYPE_NAMES.get(request.message_type, request.message_type.name),
            csr_der=self.unwrapped.content,
            subject=grant.subject_text,
            sans=grant.sans,
            challenge=csr.challenge.decode("utf-8", "replace"),
            signer_der=self.signer.der if self.signer is not None else b"",
            profile=grant.profile.name,
            renewal=grant.renews is not None,
        )


@dataclass(slots=True)
class PreparedBatch:
    """A batch on its way through the stages."""

    items: list[_Item]          # the messages the core could unwrap
    answers: list[Answer]       # one per message, in order (the items' answers among them)
    issued_at: float

    def validation_requests(self) -> list[ValidationRequest]:
        """One per request about to get a new certificate, for set_verdicts."""
        return [request for _, request in self._waiting()]

    def set_verdicts(self, verdicts: Sequence[Verdict | BaseException]) -> None:
        """The verdicts of validation_requests, in the same order."""
        for (item, _), verdict in zip(self._waiting(), verdicts, strict=True):
            item.verdict = verdict

    def _waiting(self) -> list[tuple[_Item, ValidationRequest]]:
        return [(i, i.validation) for i in self.items
                if i.awaits_validation and i.validation is not None]


def _unavailable(detail: str) -> Answer:
    error = KeysUnavailable(detail=detail)
    return Answer(error=error, status=f"HTTP {error.http_status}", reason=detail)


def _each(call: Callable[[Sequence[_In]], Sequence[_Out]],
          inputs: Sequence[_In], what: str) -> list[_Out | Exception]:
    """One call for a whole batch; if it raises, one call per input, so only the culprit fails.

    The native core answers per item, but the Python around it (building the
    inputs, reading the results) runs for the batch at once: an exception
    there must not cost every other request of the batch its answer.
    """
    try:
        return list(call(inputs))
    except Exception:  # noqa: BLE001 - isolate below
        log.exception("%s failed for a batch of %d; retrying one by one", what, len(inputs))
    results: list[_Out | Exception] = []
    for one in inputs:
        try:
            results.append(call([one])[0])
        except Exception as e:  # noqa: BLE001 - this input's own failure
            log.exception("%s failed for one input", what)
            results.append(e)
    return results


class KeySource(Protocol):
    """The native context, for keys that may go away for a while (keys in a token).

    The service asks for the context at the start of each batch, and, when a
    private-key operation failed, whether the keys are gone: then nothing of
    the batch is answered but 503 (KeysUnavailable), since a decrypt or a
    signature that failed for want of its key says nothing about the request.
    """

    def context(self) -> ScepContext | None:
        """The context, or None while the keys cannot be used."""

    def lost(self) -> bool:
        """Whether the keys are gone; asked after a private-key operation failed."""


class _FixedKeys:
    """Keys read from files: loaded once, never gone."""

    def __init__(self, ctx: ScepContext) -> None:
        self._ctx = ctx

    def context(self) -> ScepContext:
        return self._ctx

    def lost(self) -> bool:
        return False


class EnrollmentService:
    """Request handling for one worker: keys in the native context, records in the ledger."""

    _ctx: ScepContext  # the keys' context for the batch being handled (set under _native)

    def __init__(
        self,
        ctx: ScepContext | KeySource,
        ledger: Ledger,
        policy: Policy,
        profiles: Mapping[str, Profile],
        issuers: Sequence[bytes],
        *,
        crl_source: Callable[[bytes], bytes | None] = lambda _issuer: None,
        clock: Callable[[], float] = time.time,
        on_commit: Callable[[float, int], None] = lambda _seconds, _issued: None,
        notice_sinks: Mapping[str, frozenset[str]] | None = None,
        refusals_noticed: Callable[[], bool] = lambda: True,
        on_refusal_unnoticed: Callable[[int], None] = lambda _count: None,
    ) -> None:
        # Where notices go: each sink and the events it wants.
        self._sinks = dict(notice_sinks or {})
        # Whether refusals get notices now (not while the outbox is too full),
        # and what is told of those that did not.
        self._refusals_noticed = refusals_noticed
        self._on_refusal_unnoticed = on_refusal_unnoticed
        self._keys: KeySource = _FixedKeys(ctx) if isinstance(ctx, ScepContext) else ctx
        # The native context serves one call at a time: each CPU stage holds it
        # throughout, record_batch only to sign a reply again.
        self._native = threading.Lock()
        self._ledger = ledger
        self._policy = policy
        self._profiles = dict(profiles)
        self._authorizer = Authorizer(ledger, policy, profiles, issuers, clock)
        self._ca_cert = issuers[0]
        self._crl_source = crl_source
        self._clock = clock
        # Told how long each ledger commit took and how many certificates it
        # recorded (the runtime turns that into metrics).
        self._on_commit = on_commit

    # ---- the batch, stage by stage ----------------------------------------------

    def handle_batch(self, messages: Sequence[bytes]) -> list[Answer]:
        """Every stage at once, with no external validation."""
        batch = self.authenticate_batch(messages)
        self.issue_batch(batch)
        self.sign_batch(batch)
        return self.record_batch(batch)

    def authenticate_batch(self, messages: Sequence[bytes]) -> PreparedBatch:
        """Stage 1: open and verify each message, look up its transaction, decide.

        Decided: a refusal, an answer from the ledger (a resend, a poll), or a
        grant waiting to be validated (if validators are configured) and issued.
        """
        with self._native:
            ctx = self._keys.context()
            if ctx is None:
                return PreparedBatch([], [_unavailable("no key context") for _ in messages],
                                     self._clock())
            self._ctx = ctx
            answers: list[Answer] = []
            items: list[_Item] = []
            for unwrapped in _each(self._ctx.unwrap_batch, messages, "unwrap"):
                if isinstance(unwrapped, Exception):
                    answers.append(Answer(
                        error=MalformedRequest("the message cannot be processed",
                                               detail=f"unwrap: {unwrapped!r}"),
                        status="HTTP 400", reason=f"unwrap: {unwrapped!r}"))
                    continue
                items.append(_Item(unwrapped, Answer()))
                answers.append(items[-1].answer)
            for item in items:
                with self._isolated(item, "authenticate"):
                    self._authenticate(item)
            readable = [i for i in items if i.request is not None and i.reply is None
                        and i.answer.error is None]
            self._look_up([i for i in readable if i.request is not None
                           and i.request.message_type in _TRANSACTION_TYPES])
            readable = [i for i in readable if i.answer.error is None]
            for item in readable:
                with self._isolated(item, "decide"):
                    self._decide(item)
            if self._policy.external_validation:
                for item in readable:
                    if item.awaits_validation:
                        with self._isolated(item, "validation request"):
                            item.validation = item.validation_request()
            self._unless_keys_lost(items)
        return PreparedBatch(items, answers, self._clock())

    # Stage 2, validation, runs in the runtime (asynchronously): it reads
    # PreparedBatch.validation_requests and hands back set_verdicts.

    def issue_batch(self, batch: PreparedBatch) -> None:
        """Stage 3: apply the verdicts, record pending requests, issue certificates.

        Each SUCCESS stands only until the commit in ``record_batch`` says otherwise.
        """
        with self._native:
            for item in batch.items:
                if item.awaits_validation:
                    with self._isolated(item, "validate"):
                        self._apply_verdict(item)
            for item in batch.items:
                if item.pending is not None:
                    with self._isolated(item, "pending store"):
                        self._record_pending(item)
            batch.issued_at = self._clock()
            self._issue([i for i in batch.items if i.issue is not None], batch.issued_at)
            self._unless_keys_lost(batch.items)

    def sign_batch(self, batch: PreparedBatch) -> None:
        """Stage 4: sign every reply, SUCCESS as if its certificate were recorded already."""
        with self._native:
            self._wrap([i for i in batch.items if i.reply is not None])
            self._unless_keys_lost(batch.items)

    def record_batch(self, batch: PreparedBatch) -> list[Answer]:
        """Stage 5: record the certificates and the notices; only then are the answers final."""
        self._commit(batch, batch.issued_at)
        self._unless_keys_lost(batch.items)
        return batch.answers

    def _unless_keys_lost(self, items: list[_Item]) -> None:
        """When a private-key operation failed because the keys are gone, every answer waits.

        A failed decrypt or signature is normally the message's own fault (a
        wrong recipient) or a bug (500); when the key source says the keys
        are gone, it was neither, and the client is asked to come back (503).
        Whatever was committed stays committed: the same request again gets
        the same certificate.
        """
        if not any(isinstance(i.unwrapped.error, DecryptFailed)
                   or isinstance(i.answer.error, InternalError) for i in items):
            return
        if not self._keys.lost():
            return
        for item in items:
            self._refuse(item, KeysUnavailable(detail="a private-key operation failed and "
                                                      "the keys are unavailable"))

    @contextmanager
    def _isolated(self, item: _Item, stage: str) -> Iterator[None]:
        """Whatever goes wrong in one message's step refuses that message only."""
        try:
            yield
        except MessageError as e:
            self._answer_failure(item, e)
        except LedgerFull as e:
            # No room to record it: no bug, and the client may come back (503).
            self._refuse(item, StorageFull(detail=f"{stage}: {e}"))
        except LedgerUnavailable as e:
            # The database is out of reach for now: come back soon (503).
            self._refuse(item, StorageUnavailable(detail=f"{stage}: {e}"))
        except Exception as e:  # noqa: BLE001 - one message must not fail its batch
            log.exception("%s failed for one message", stage)
            self._answer_failure(item, BadRequest("the request cannot be processed",
                                                  detail=f"{stage}: {e!r}"))

    def _answer_failure(self, item: _Item, error: MessageError) -> None:
        """A signed FAILURE when the message was authenticated, else a plain 400."""
        if item.request is not None:
            self._fail(item, error)
        else:
            self._refuse(item, MalformedRequest("the message cannot be processed",
                                                detail=f"{error.reason}: {error.detail}"))

    # ---- operator decisions on pending requests -----------------------------

    def approve(self, request_id: str) -> CertRecord:
        """Issues and records the certificate of a pending request (see approval.approve)."""
        return approval.approve(request_id, ledger=self._ledger, authorizer=self._authorizer,
                                issue=self._issue_one, clock=self._clock,
                                notices=self._approval_notices)

    def _approval_notices(self, record: CertRecord, csr_der: bytes) -> list[Notice]:
        now = self._clock()
        return self._for_sinks("issued", issued_event(record, message_type="PKCSReq",
                                                      csr_der=csr_der, at=now),
                               now, record.serial)

    def reject(self, request_id: str, reason: str = "") -> PendingRequest:
        """Refuses a pending request: its next poll gets FAILURE badRequest."""
        return self._ledger.decide_pending(request_id, "rejected", self._clock(), reason)

    def _issue_one(self, issue: IssueRequest) -> bytes:
        with self._native:
            ctx = self._keys.context()
            if ctx is None:
                raise KeysUnavailable(detail="no key context")
            return ctx.issue(issue)

    # ---- step 1: authenticate -----------------------------------------------

    def _authenticate(self, item: _Item) -> None:
        """Verified attributes in ``item.request``, or a refusal already decided."""
        u = item.unwrapped
        error = u.error
        # What failed before the signature was verified, or what we cannot
        # decrypt, gets no signed reply: nothing tells us whom we would answer.
        # The client learns only which of the two; the core's words go to the log.
        if error is not None and not isinstance(error, AlgorithmRefused | CsrInvalid):
            public = ("the message cannot be decrypted" if isinstance(error, DecryptFailed)
                      else "the message does not verify")
            self._refuse(item, MalformedRequest(public, detail=error.reason))
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
                self._refuse(item, MalformedRequest("the message uses an unknown algorithm",
                                                    detail=str(e)))
                return
            item.answer.transaction_id = u.transaction_id.decode("ascii", "replace")
            self._fail(item, e)
            return
        except MalformedRequest as e:
            self._refuse(item, e)
            return
        item.request = request
        item.answer.message_type = request.message_type.name
        item.answer.transaction_id = request.transaction_id
        item.signer = Signer.parse(u.signer_cert, u.signer_key_sha256)
        item.requester = self._requester(item.signer)

    def _requester(self, signer: Signer) -> bytes:
        """The identity a device's transactions are keyed on.

        A device's transactions are keyed on (transactionID, requester)
        (RFC 8894 section 3.2.1.1: the transactionID is unique per requester,
        and clients derive it from their key). The requester is the signer's
        key for a first enrollment; for a message signed by a certificate we
        issued, it is that certificate, so that a device renewing with the same
        key and transactionID (micromdm's scepclient does) starts a new
        transaction with each certificate instead of replaying the first.
        """
        if self._authorizer.issued_by_us(signer):
            return hashlib.sha256(signer.der).digest()
        return signer.key_sha256

    # ---- step 2: decide -------------------------------------------------------

    def _look_up(self, items: list[_Item]) -> None:
        """What the ledger knows of each transaction, in one read for the batch."""
        keys = [(i.request.transaction_id, i.requester) for i in items if i.request is not None]
        try:
            found = self._ledger.find_transactions(keys)
        except LedgerUnavailable as e:
            # Without the ledger nothing of these may be decided (a resend
            # would be issued twice): come back soon (503).
            for item in items:
                self._refuse(item, StorageUnavailable(detail=f"look up: {e}"))
            return
        for item, (record, pending) in zip(items, found, strict=True):
            item.known_record, item.known_pending = record, pending

    def _decide(self, item: _Item) -> None:
        request, error = item.request, item.unwrapped.error
        if request is None or item.signer is None:
            raise InternalError("an unauthenticated message reached the decision")
        if isinstance(error, AlgorithmRefused):
            raise BadAlg(error.summary, detail=error.reason)
        if isinstance(error, CsrInvalid):
            raise BadRequest("the certification request is malformed", detail=error.reason)
        # Every SUCCESS is an envelope to the signer's key: refuse before
        # anything is issued or looked up if it could not be opened.
        self._authorizer.check_deliverable(item.signer)
        message_type = request.message_type
        if message_type in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
            self._enroll(item, request)
        elif message_type is MessageType.CERT_POLL:
            # RFC 8894 section 3.3.3: CertPoll asks about a transaction by its
            # transactionID, from the same requester.
            if not self._answer_known(item):
                raise BadCertId("no request with this transactionID")
        elif message_type is MessageType.GET_CERT:
            record = lookups.certificate(self._ledger, item.unwrapped.content)
            self._succeed(item, record.der, record.serial, record.profile, chain=False)
        elif message_type is MessageType.GET_CRL:
            crl = lookups.crl(self._crl_source, item.unwrapped.content)
            item.reply = CertRepSpec(request=item.unwrapped, status=PKIStatus.SUCCESS, crls=(crl,))
            item.answer.status = "SUCCESS"
        else:
            raise BadRequest(f"{message_type.name} is not a request")

    def _enroll(self, item: _Item, request: ScepRequestMessage) -> None:
        u = item.unwrapped
        csr = u.csr
        if csr is None or item.signer is None:
            raise BadRequest(f"{request.message_type.name} without a certification request")
        item.csr_sha256 = hashlib.sha256(u.content).digest()
        if self._answer_known(item):
            return
        self._grant(item, request)

    def _grant(self, item: _Item, request: ScepRequestMessage, profile_name: str = "") -> None:
        """What the rules grant the request: a certificate to issue, or one to approve."""
        u = item.unwrapped
        csr = u.csr
        if csr is None or item.signer is None:
            raise InternalError("a request without a CSR reached the grant")
        grant = self._authorizer.authorize(request.message_type, csr, u.content, item.signer,
                                           profile_name=profile_name)
        item.grant = grant
        item.issue = item.pending = None
        now = self._clock()
        if grant.needs_approval:
            item.pending = PendingRequest(
                request_id=secrets.token_hex(8),
                transaction_id=request.transaction_id,
                requester_key_sha256=item.requester,
                csr_sha256=item.csr_sha256,
                csr_der=u.content,
                subject=grant.subject_text,
                sans=grant.sans,
                profile=grant.profile.name,
                received_at=now,
            )
            return
        item.issue = issue_request(grant, csr.key_type, csr.subject_der, now, request=u)

    def _answer_known(self, item: _Item) -> bool:
        """Answers a transaction the ledger knows: its certificate, PENDING, or a refusal.

        A message that carries a CSR must carry the same one: RFC 8894
        section 3.3.1 makes the same transactionID a resend, and another CSR
        under it is not. A certificate since revoked or expired is never
        sent again, and no longer holds its transaction: another CSR under
        it starts a new one. Returns False for a transaction not seen before
        (or free again).
        """
        existing, pending = item.known_record, item.known_pending
        if existing is not None and not good_at(existing, self._clock()):
            if not item.csr_sha256 or existing.csr_sha256 == item.csr_sha256:
                raise BadRequest("the certificate of this transaction is revoked or expired")
            return False
        known_csr = existing.csr_sha256 if existing is not None else (
            pending.csr_sha256 if pending is not None else None)
        if known_csr is None:
            return False
        if item.csr_sha256 and known_csr != item.csr_sha256:
            raise BadRequest(_CONFLICT)
        if existing is not None:
            self._succeed(item, existing.der, existing.serial, existing.profile)
        elif pending is not None:
            self._answer_pending(item, pending)
        return True

    def _answer_pending(self, item: _Item, pending: PendingRequest) -> None:
        if pending.status == "rejected":
            # The operator's note is written for the device's owner.
            raise BadRequest(f"request rejected{': ' + pending.reason if pending.reason else ''}")
        # Approved requests are issued by the approval itself; until the
        # certificate is on record the answer stays PENDING.
        self._pend(item, pending.request_id)

    # ---- step 2b: the validators' verdict ------------------------------------

    def _apply_verdict(self, item: _Item) -> None:
        """Refuses the request unless every validator allowed it (fail closed).

        A validator may choose the profile of a first enrollment: the grant is
        then made again under that profile, by the same rules, and may keep or
        drop names but not give any the validators were not shown (another
        subject, another subjectAltName): what they allowed is what is issued.
        """
        if not self._policy.external_validation:
            return
        verdict = item.verdict
        if isinstance(verdict, BaseException):
            raise BadRequest("the request could not be validated", detail=repr(verdict))
        if verdict is None:
            raise BadRequest("the request could not be validated",
                             detail="no verdict reached the issue stage")
        if not verdict.allow:
            raise BadRequest(_refused_by_validation(verdict.reason))
        grant, request = item.grant, item.request
        if verdict.profile and grant is not None and request is not None \
                and verdict.profile != grant.profile.name:
            self._grant(item, request, verdict.profile)
            shown, regranted = item.validation, item.grant
            if shown is None or regranted is None \
                    or regranted.subject_text != shown.subject \
                    or not set(regranted.sans) <= set(shown.sans):
                raise BadRequest("the profile the validator chose gives other names than "
                                 "it was shown")

    # ---- step 3: pending requests, issue ---------------------------------------

    def _record_pending(self, item: _Item) -> None:
        if item.pending is None or item.grant is None:
            return
        try:
            stored = self._ledger.add_pending(item.pending, item.grant.challenge)
        except ChallengeUsedUp:
            raise BadRequest(_USED_UP) from None
        if stored.csr_sha256 != item.csr_sha256:
            raise BadRequest(_CONFLICT)
        self._answer_pending(item, stored)

    def _issue(self, items: list[_Item], now: float) -> None:
        """Issues, and answers SUCCESS until the commit says otherwise."""
        if not items:
            return
        issued = _each(self._ctx.issue_batch,
                       [i.issue for i in items if i.issue is not None], "issue")
        for item, result in zip(items, issued, strict=True):
            item.issue, issue = None, item.issue
            if issue is None or item.grant is None:
                continue
            if isinstance(result, CsrInvalid):
                self._fail(item, BadMessageCheck(
                    "the certification request is invalid (signature or encoding)",
                    detail=result.reason))
                continue
            if isinstance(result, NativeError):
                self._internal(item, f"issue: {result.reason}")
                continue
            if isinstance(result, Exception):
                self._answer_failure(item, BadRequest("the certificate cannot be issued",
                                                      detail=f"issue: {result!r}"))
                continue
            with self._isolated(item, "record"):
                record = cert_record(
                    issue, result, item.grant, now=now,
                    transaction_id=item.unwrapped.transaction_id.decode("ascii"),
                    requester=item.requester, csr_sha256=item.csr_sha256)
                self._succeed(item, record.der, record.serial, record.profile)
                item.record = record

    # ---- step 4: record ------------------------------------------------------------

    def _commit(self, batch: PreparedBatch, now: float) -> None:
        """One durable transaction: the batch's certificates, the challenges they
        spend, and the notices of what happened to its enrollments. An answer
        whose certificate or notice is not on disk does not leave."""
        notices = self._notices(batch.items, now)
        items = [i for i in batch.items if i.record is not None or id(i) in notices]
        if not items:
            return
        committed = [i for i in items if i.record is not None]
        records = [i.record for i in committed if i.record is not None]
        challenges = [i.grant.challenge if i.grant is not None else None for i in committed]
        renewals = [self._renewal(i) for i in committed]
        started = time.perf_counter()
        try:
            outcomes = self._ledger.commit(records, challenges,
                                           [n for ns in notices.values() for n in ns], renewals)
        except LedgerFull as e:
            # Nothing was recorded, so nothing may leave; the client may come back (503).
            for item in items:
                self._refuse(item, StorageFull(detail=f"ledger commit: {e}"))
            return
        except LedgerUnavailable as e:
            # Recorded or not, nothing may leave: the client comes back (503),
            # and its resend gets what the database recorded, if anything.
            for item in items:
                self._refuse(item, StorageUnavailable(detail=f"ledger commit: {e}"))
            return
        except Exception as e:  # noqa: BLE001 - nothing of this batch may leave
            for item in items:
                self._internal(item, f"ledger commit: {e}")
            return
        self._on_commit(time.perf_counter() - started,
                        sum(isinstance(o, Recorded) for o in outcomes))
        sign_again: list[_Item] = []
        for item, outcome in zip(committed, outcomes, strict=True):
            if isinstance(outcome, Recorded):
                continue
            if isinstance(outcome, AlreadyIssued):
                # A resend recorded by another batch since this one looked.
                record = outcome.record
                self._succeed(item, record.der, record.serial, record.profile)
                sign_again.append(item)
            elif isinstance(outcome, TransactionConflict):
                self._fail(item, BadRequest(_CONFLICT))
                sign_again.append(item)
            elif isinstance(outcome, ChallengeRefused):
                self._fail(item, BadRequest(_USED_UP))
                sign_again.append(item)
            elif isinstance(outcome, RenewedGone):
                # Revoked while the request waited, or renewed (and replaced)
                # by another request first.
                self._fail(item, BadRequest("the certificate this request renews is revoked "
                                            "or expired"))
                sign_again.append(item)
            elif isinstance(outcome, SerialCollision):
                self._internal(item, f"serial {outcome.serial:x} collided")
        self._notify_late_refusals([i for i in committed if i.answer.status == "FAILURE"], now)
        if sign_again:
            with self._native:
                self._wrap(sign_again)

    def _renewal(self, item: _Item) -> Renewal | None:
        """What the item's certificate renews, for the commit: the old certificate must
        still be good then, and is revoked (superseded) with it when renewals
        replace what they renew."""
        renews = item.grant.renews if item.grant is not None else None
        if renews is None:
            return None
        return Renewal(renews.serial, SUPERSEDED if self._policy.revoke_on_replace else None)

    # ---- notices ----------------------------------------------------------------

    def _notices(self, items: Sequence[_Item], now: float) -> dict[int, list[Notice]]:
        """The notices of a batch's enrollments, by id() of their item: an issued
        certificate's (written only if it is recorded) or a refusal's."""
        if not self._sinks:
            return {}
        notices: dict[int, list[Notice]] = {}
        refusals = self._refusals_noticed()
        unnoticed = 0
        for item in items:
            request = item.request
            if request is None or request.message_type not in _ENROLLMENT_TYPES:
                continue
            message_type = _MESSAGE_TYPE_NAMES[request.message_type]
            if item.record is not None:
                body = issued_event(item.record, message_type=message_type,
                                    csr_der=item.unwrapped.content, at=now)
                notices[id(item)] = self._for_sinks("issued", body, now, item.record.serial)
                renews = item.grant.renews if item.grant is not None else None
                if renews is not None and self._policy.revoke_on_replace:
                    # Written only with the new record, as the revocation is.
                    notices[id(item)] += self._for_sinks(
                        "revoked", revoked_event(renews, reason=SUPERSEDED, at=now), now,
                        item.record.serial)
            elif item.answer.status == "FAILURE":
                if refusals:
                    notices[id(item)] = self._for_sinks("refused", self._refusal(item, now), now)
                else:
                    unnoticed += 1
        if unnoticed:
            self._on_refusal_unnoticed(unnoticed)
        return {k: v for k, v in notices.items() if v}

    def _notify_late_refusals(self, items: Sequence[_Item], now: float) -> None:
        """Refusals the commit decided (a conflict, a challenge spent meanwhile): their
        issued notices were not written, their refused notices are written now."""
        if not items or not self._refusals_noticed():
            return
        notices = [n for item in items
                   for n in self._for_sinks("refused", self._refusal(item, now), now)]
        if not notices:
            return
        try:
            self._ledger.add_notices(notices)
        except Exception:  # noqa: BLE001 - the refusal stands; only its notice is lost
            log.exception("notices of %d refusals could not be written", len(items))

    def _refusal(self, item: _Item, now: float) -> bytes:
        request = item.request
        return refused_event(
            transaction_id=request.transaction_id if request is not None else "",
            message_type=_MESSAGE_TYPE_NAMES.get(request.message_type, "")
            if request is not None else "",
            csr_der=item.unwrapped.content,
            fail_info=_RFC_FAIL_INFO.get(item.answer.fail_info, item.answer.fail_info),
            reason=item.reply.fail_info_text if item.reply is not None else "",
            profile=item.grant.profile.name if item.grant is not None else "", at=now)

    def _for_sinks(self, event: str, body: bytes, now: float,
                   serial: int | None = None) -> list[Notice]:
        return notices_for(event, body, [s for s, events in self._sinks.items()
                                         if event in events], now, serial=serial)

    # ---- step 5: sign the replies -------------------------------------------

    def _wrap(self, items: list[_Item]) -> None:
        items = [i for i in items if i.reply is not None]
        if not items:
            return
        results = _each(self._ctx.wrap_batch,
                        [i.reply for i in items if i.reply is not None], "wrap")
        for item, result in zip(items, results, strict=True):
            if isinstance(result, NativeError):
                self._internal(item, f"wrap: {result.reason}")
            elif isinstance(result, Exception):
                # Nothing signed for this one: no signed answer is possible.
                self._refuse(item, MalformedRequest("the reply cannot be built",
                                                    detail=f"wrap: {result!r}"))
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
        item.answer.body = b""
        item.issue = None
        item.pending = None
        item.record = None
        item.answer.serial = None
        item.answer.status = "FAILURE"
        item.answer.fail_info = FailInfo(fail_info).name
        item.answer.reason = f"{error.reason}: {error.detail}" if error.detail else error.reason

    def _refuse(self, item: _Item, error: ScepError) -> None:
        item.reply = None
        item.answer.body = b""  # a reply signed before the refusal never leaves
        item.answer.serial = None
        item.issue = None
        item.pending = None
        item.record = None
        item.answer.error = error
        item.answer.status = f"HTTP {error.http_status}"
        item.answer.reason = error.detail or error.reason or ""

    def _internal(self, item: _Item, detail: str) -> None:
        self._refuse(item, InternalError(detail))  # the detail is the log line's reason
