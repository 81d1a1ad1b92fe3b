"""The Python face of the native SCEP core.

Every pointer the core hands back is wrapped in ``ffi.gc`` at once, so a
result is freed when its Python object goes, whatever path the caller takes.
The batch methods make one native call for many items; cffi releases the GIL
for the duration, so a batch may run in a worker thread beside the event loop.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scep_fast import __version__
from scep_fast._native import ffi, lib
from scep_fast.crypto.errors import (
    InvalidArgument,
    NativeError,
    NativeInternalError,
    error_for,
)

NATIVE_ABI = 3

# Named as scep_fast.protocol.KeyTransport values.
KEY_TRANSPORT_NAMES = {1: "rsa-pkcs1-v1_5", 2: "rsa-oaep"}
_KEY_TYPES = {"rsaEncryption": "RSA", "id-ecPublicKey": "EC"}


def check_native_module() -> None:
    """Refuses a compiled module built from other sources than this package."""
    built = ffi.string(lib.scep_native_version()).decode()
    if built != __version__ or lib.scep_native_abi() != NATIVE_ABI:
        raise ImportError(
            f"scep_fast._native was built for version {built} (ABI {lib.scep_native_abi()}), "
            f"but the package is {__version__} (ABI {NATIVE_ABI}); rebuild with `pip install .`"
        )


check_native_module()


def _text(buf: Any) -> str:
    return str(ffi.string(buf).decode("utf-8", "replace"))


def _bytes(b: Any) -> bytes:
    return bytes(ffi.buffer(b.data, b.len)) if b.data != ffi.NULL else b""


@functools.cache
def nid_name(nid: int) -> str:
    """OpenSSL's short name for a NID ("SHA256", "AES-128-CBC"), or "".

    Cached: a handful of NIDs occur, and every unwrapped message names five.
    """
    return _text(lib.scep_nid_name(nid))


class _Inputs:
    """Keeps the Python buffers behind an array of scep_buf alive during a call."""

    def __init__(self) -> None:
        self._keep: list[Any] = []

    def fill(self, target: Any, data: bytes | None) -> None:
        if data:
            buf = ffi.from_buffer(data)
            self._keep.append(buf)
            target.data = buf
            target.len = len(data)
        else:
            target.data = ffi.NULL
            target.len = 0


@dataclass(frozen=True, slots=True)
class Algorithms:
    """What the requester used; a reply uses the same."""

    digest: str
    cipher: str
    key_transport: str
    oaep_digest: str = ""
    oaep_mgf1_digest: str = ""


@dataclass(frozen=True, slots=True)
class CsrInfo:
    """What policy needs from a PKCS#10 request (its signature is checked at issue)."""

    challenge: bytes
    subject_der: bytes
    san_der: bytes
    key_type: str  # "RSA", "EC" or another OpenSSL short name
    key_bits: int
    curve: str  # "prime256v1", "secp384r1", or ""


class Unwrapped:
    """One request after unwrap: verified attributes, algorithms and plaintext.

    ``error`` is None when every step succeeded. Even when it is set, the
    attributes are filled as far as the core got: a request refused with
    AlgorithmRefused is authenticated and can still receive a signed FAILURE.
    """

    __slots__ = (
        "_ptr",
        "error",
        "message_type",
        "transaction_id",
        "sender_nonce",
        "signer_cert",
        "signer_key_sha256",
        "algorithms",
        "content",
        "csr",
    )

    def __init__(self, ptr: Any) -> None:
        self._ptr = ptr
        r = ptr
        self.error: NativeError | None = error_for(r.status, _text(r.error)) if r.status else None
        self.message_type: int = r.message_type
        self.transaction_id = _bytes(r.transaction_id)
        self.sender_nonce = _bytes(r.sender_nonce)
        self.signer_cert = _bytes(r.signer_cert)
        self.signer_key_sha256 = bytes(ffi.buffer(r.signer_key_sha256, 32))
        self.algorithms = Algorithms(
            digest=nid_name(r.digest_nid),
            cipher=nid_name(r.cipher_nid),
            key_transport=KEY_TRANSPORT_NAMES.get(r.key_transport, ""),
            oaep_digest=nid_name(r.oaep_md_nid),
            oaep_mgf1_digest=nid_name(r.oaep_mgf1_md_nid),
        )
        self.content = _bytes(r.content)
        self.csr: CsrInfo | None = None
        if r.csr_parsed:
            self.csr = CsrInfo(
                challenge=_bytes(r.csr_challenge),
                subject_der=_bytes(r.csr_subject),
                san_der=_bytes(r.csr_san),
                key_type=_KEY_TYPES.get(nid_name(r.csr_key_nid), nid_name(r.csr_key_nid)),
                key_bits=r.csr_key_bits,
                curve=nid_name(r.csr_curve_nid),
            )

    @property
    def authenticated(self) -> bool:
        """True when the signature verified, so a signed CertRep can answer it."""
        return bool(self.signer_cert) and bool(self.transaction_id) and bool(self.sender_nonce)

    def raise_for_error(self) -> Unwrapped:
        if self.error is not None:
            raise self.error
        return self


@dataclass(frozen=True, slots=True)
class IssueRequest:
    """One certificate to issue: a CSR and what the profile decided.

    The CSR comes from an unwrapped PKCSReq (``request``, whose parsed CSR the
    core reuses) or as DER (``csr_der``), for example a stored pending request.
    """

    serial: int
    not_before: int  # seconds since the epoch
    not_after: int
    request: Unwrapped | None = None
    csr_der: bytes = b""
    subject_der: bytes = b""  # empty: the CSR's subject
    extensions_der: bytes = b""  # DER Extensions, added as given


@dataclass(frozen=True, slots=True)
class CertRepSpec:
    """One CertRep to build, answering an unwrapped request."""

    request: Unwrapped
    status: int  # PKIStatus number
    fail_info: int | None = None
    fail_info_text: str = ""
    certs: Sequence[bytes] = ()  # SUCCESS: the issued certificate first
    crls: Sequence[bytes] = ()


def _results(ptrs: Any, produced: int, wanted: int, free: Any) -> list[Any]:
    owned = [ffi.gc(ptrs[i], free) for i in range(produced)]
    if produced != wanted:
        raise MemoryError("the native core ran out of memory")
    return owned


class Pkcs11Module:
    """A PKCS#11 module opened through libp11's engine, logged in with a PIN.

    PKCS#11 allows one initialisation of a module per process, and libp11
    finalises the module when its engine is released: open one per process
    and module (``scep_fast.runtime.keys`` keeps that cache), and keep it
    while any of its keys is in use.
    """

    __slots__ = ("_ptr",)

    def __init__(self, module_path: str, pin: bytes) -> None:
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        ptr = lib.scep_pkcs11_open(module_path.encode(), pin, err, len(err))
        if ptr == ffi.NULL:
            raise InvalidArgument(_text(err))
        self._ptr = ffi.gc(ptr, lib.scep_pkcs11_free)

    def load_key(self, uri: str) -> NativeKey:
        """The private key an RFC 7512 URI names; it never leaves the token.

        The public key object of the same name is loaded beside it when there
        is one (an EC private key object has no public point).
        """
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        ptr = lib.scep_pkcs11_load_key(self._ptr, uri.encode(), _public_uri(uri).encode(),
                                       err, len(err))
        if ptr == ffi.NULL:
            raise InvalidArgument(f"{uri}: {_text(err)}")
        return NativeKey(ptr, self)


def _public_uri(uri: str) -> str:
    """The URI of the public key object beside the private key ``uri`` names."""
    path, sep, query = uri.partition("?")
    parts = [p for p in path.split(";") if p and not p.lower().startswith("type=")]
    if parts and parts[0].lower().startswith("pkcs11:type="):
        parts[0] = "pkcs11:"
    public = ";".join(parts).replace("pkcs11:;", "pkcs11:", 1) + ";type=public"
    return public.replace("pkcs11:;", "pkcs11:", 1) + sep + query


class NativeKey:
    """A private key held by the core: parsed from DER, or a handle into a token.

    The context takes it where it takes a DER key; ``sign`` signs what the
    callers of the core build themselves (self-signed CA certificates, CRLs).
    """

    __slots__ = ("_ptr", "_module")

    def __init__(self, ptr: Any, module: Pkcs11Module | None = None) -> None:
        self._ptr = ffi.gc(ptr, lib.scep_key_free)
        # The module outlives its keys.
        self._module = module

    @classmethod
    def from_der(cls, der: bytes) -> NativeKey:
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        ptr = lib.scep_key_from_der(der, len(der), err, len(err))
        if ptr == ffi.NULL:
            raise InvalidArgument(_text(err))
        return cls(ptr)

    def public_key_der(self) -> bytes:
        """The SubjectPublicKeyInfo, DER."""
        out = ffi.new("scep_bytes *")
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        if not lib.scep_key_public_der(self._ptr, out, err, len(err)):
            raise InvalidArgument(_text(err))
        try:
            return _bytes(out)
        finally:
            lib.scep_bytes_free(out)

    def sign(self, digest: str, data: bytes) -> bytes:
        """A signature over data with ``digest`` ("SHA256"): PKCS#1 v1.5 or DER ECDSA."""
        keep = _Inputs()
        buf = ffi.new("scep_buf *")
        keep.fill(buf, data)
        out = ffi.new("scep_bytes *")
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        if not lib.scep_key_sign(self._ptr, digest.encode(), buf[0], out, err, len(err)):
            raise NativeInternalError(_text(err))
        try:
            return _bytes(out)
        finally:
            lib.scep_bytes_free(out)


KeyMaterial = bytes | NativeKey
"""A private key as the context takes it: DER, or a key the core already holds."""


class ScepContext:
    """The keys and algorithm policy of one worker, loaded once into the core.

    Certificates are DER; a key is DER or a :class:`NativeKey` (which may live
    in a token). After construction the context is only read, so its batch
    methods may run on several threads at once.
    """

    def __init__(
        self,
        *,
        recipients: Sequence[tuple[bytes, KeyMaterial]],
        signer: tuple[bytes, KeyMaterial],
        issuer: tuple[bytes, KeyMaterial] | None = None,
        allow_legacy: bool = False,
        refuse_sha1: bool = False,
        refuse_3des: bool = False,
    ) -> None:
        flags = (
            (lib.SCEP_ALLOW_LEGACY if allow_legacy else 0)
            | (lib.SCEP_REFUSE_SHA1 if refuse_sha1 else 0)
            | (lib.SCEP_REFUSE_3DES if refuse_3des else 0)
        )
        err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
        ptr = lib.scep_ctx_new(flags, err, len(err))
        if ptr == ffi.NULL:
            raise InvalidArgument(_text(err))
        self._ctx = ffi.gc(ptr, lib.scep_ctx_free)
        if not recipients:
            raise InvalidArgument("at least one decryption certificate and key are needed")
        for cert, key in recipients:
            self._load(lib.scep_ctx_add_recipient, lib.scep_ctx_add_recipient_key, cert, key,
                       err)
        self._load(lib.scep_ctx_set_signer, lib.scep_ctx_set_signer_key, signer[0], signer[1],
                   err)
        if issuer is not None:
            self._load(lib.scep_ctx_set_issuer, lib.scep_ctx_set_issuer_key, issuer[0],
                       issuer[1], err)

    def _load(self, from_der: Any, from_key: Any, cert: bytes, key: KeyMaterial,
              err: Any) -> None:
        # One entry per kind of key, one keypair in the core either way.
        if isinstance(key, NativeKey):
            ok = from_key(self._ctx, cert, len(cert), key._ptr, err, len(err))
        else:
            ok = from_der(self._ctx, cert, len(cert), key, len(key), err, len(err))
        if not ok:
            raise InvalidArgument(_text(err))

    def unwrap_batch(self, messages: Sequence[bytes]) -> list[Unwrapped]:
        n = len(messages)
        if n == 0:
            return []
        bufs = ffi.new("scep_buf[]", n)
        keep = _Inputs()
        for i, message in enumerate(messages):
            keep.fill(bufs[i], message)
        out = ffi.new("scep_unwrap_result *[]", n)
        produced = lib.scep_unwrap_batch(self._ctx, bufs, n, out)
        return [Unwrapped(p) for p in _results(out, produced, n, lib.scep_unwrap_result_free)]

    def unwrap(self, message: bytes) -> Unwrapped:
        """Unwraps one message and raises its error, if any."""
        return self.unwrap_batch([message])[0].raise_for_error()

    def issue_batch(self, requests: Sequence[IssueRequest]) -> list[bytes | NativeError]:
        n = len(requests)
        if n == 0:
            return []
        items = ffi.new("scep_issue_item[]", n)
        keep = _Inputs()
        for i, req in enumerate(requests):
            if req.serial <= 0 or req.serial.bit_length() > 159:
                raise InvalidArgument("a serial number is positive and at most 20 octets")
            if (req.request is None) == (not req.csr_der):
                raise InvalidArgument("give either an unwrapped request or a DER CSR")
            item = items[i]
            item.request = req.request._ptr if req.request is not None else ffi.NULL
            keep.fill(item.csr, req.csr_der)
            keep.fill(item.serial, req.serial.to_bytes((req.serial.bit_length() + 7) // 8, "big"))
            item.not_before = req.not_before
            item.not_after = req.not_after
            keep.fill(item.subject, req.subject_der)
            keep.fill(item.extensions, req.extensions_der)
        out = ffi.new("scep_issue_result *[]", n)
        produced = lib.scep_issue_batch(self._ctx, items, n, out)
        return [
            error_for(r.status, _text(r.error)) if r.status else _bytes(r.cert)
            for r in _results(out, produced, n, lib.scep_issue_result_free)
        ]

    def issue(self, request: IssueRequest) -> bytes:
        return _raise(self.issue_batch([request])[0])

    def wrap_batch(self, specs: Sequence[CertRepSpec]) -> list[bytes | NativeError]:
        n = len(specs)
        if n == 0:
            return []
        items = ffi.new("scep_wrap_item[]", n)
        keep = _Inputs()
        for i, spec in enumerate(specs):
            item = items[i]
            item.request = spec.request._ptr
            item.pki_status = spec.status
            item.fail_info = -1 if spec.fail_info is None else int(spec.fail_info)
            keep.fill(item.fail_info_text, spec.fail_info_text.encode())
            keep.fill(item.certs, b"".join(spec.certs))
            keep.fill(item.crls, b"".join(spec.crls))
        out = ffi.new("scep_wrap_result *[]", n)
        produced = lib.scep_wrap_batch(self._ctx, items, n, out)
        return [
            error_for(r.status, _text(r.error)) if r.status else _bytes(r.message)
            for r in _results(out, produced, n, lib.scep_wrap_result_free)
        ]

    def wrap(self, spec: CertRepSpec) -> bytes:
        return _raise(self.wrap_batch([spec])[0])


def _raise(result: bytes | NativeError) -> bytes:
    if isinstance(result, NativeError):
        raise result
    return result


def certs_only(certs: Sequence[bytes], crls: Sequence[bytes] = ()) -> bytes:
    """A degenerate certs-only SignedData holding certs (in this order) and crls."""
    keep = _Inputs()
    cert_buf = ffi.new("scep_buf *")
    crl_buf = ffi.new("scep_buf *")
    keep.fill(cert_buf, b"".join(certs))
    keep.fill(crl_buf, b"".join(crls))
    out = ffi.new("scep_bytes *")
    err = ffi.new("char[]", lib.SCEP_ERROR_TEXT_LEN)
    if not lib.scep_certs_only(cert_buf[0], crl_buf[0], out, err, len(err)):
        raise InvalidArgument(_text(err))
    try:
        return _bytes(out)
    finally:
        lib.scep_bytes_free(out)
