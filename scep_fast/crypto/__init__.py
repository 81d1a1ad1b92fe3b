"""Thin Python face of the native SCEP core: no I/O, no policy."""

from scep_fast.crypto.core import (
    Algorithms,
    CertRepSpec,
    CsrInfo,
    IssueRequest,
    KeyMaterial,
    NativeKey,
    Pkcs11Module,
    ScepContext,
    Unwrapped,
    certs_only,
    nid_name,
)
from scep_fast.crypto.errors import (
    AlgorithmRefused,
    CsrInvalid,
    DecryptFailed,
    InvalidArgument,
    MalformedMessage,
    NativeError,
    NativeInternalError,
    SignatureInvalid,
)
from scep_fast.crypto.keys import der_certificate, der_private_key

__all__ = [
    "AlgorithmRefused",
    "Algorithms",
    "CertRepSpec",
    "CsrInfo",
    "CsrInvalid",
    "DecryptFailed",
    "InvalidArgument",
    "IssueRequest",
    "KeyMaterial",
    "MalformedMessage",
    "NativeError",
    "NativeInternalError",
    "NativeKey",
    "Pkcs11Module",
    "ScepContext",
    "SignatureInvalid",
    "Unwrapped",
    "certs_only",
    "der_certificate",
    "der_private_key",
    "nid_name",
]
