"""SCEP numbers and names, with the RFC 8894 values as enum values.

Nothing here does anything: these are the vocabulary the rest of the
protocol layer, the service and the runtime share.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

__all__ = [
    "OID_FAIL_INFO",
    "OID_FAIL_INFO_TEXT",
    "OID_MESSAGE_TYPE",
    "OID_PKI_STATUS",
    "OID_RECIPIENT_NONCE",
    "OID_SENDER_NONCE",
    "OID_TRANSACTION_ID",
    "REQUEST_MESSAGE_TYPES",
    "ContentCipher",
    "DigestAlgorithm",
    "FailInfo",
    "KeyTransport",
    "MessageType",
    "Operation",
    "PKIStatus",
]


class MessageType(IntEnum):
    """The messageType signed attribute (RFC 8894 §3.2.1.2)."""

    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20
    GET_CERT = 21
    GET_CRL = 22


# Only the CA sends CertRep; every other type is something a client asks
# for (RFC 8894 §3.3).
REQUEST_MESSAGE_TYPES: frozenset[MessageType] = frozenset(
    {
        MessageType.RENEWAL_REQ,
        MessageType.PKCS_REQ,
        MessageType.CERT_POLL,
        MessageType.GET_CERT,
        MessageType.GET_CRL,
    }
)


class PKIStatus(IntEnum):
    """The pkiStatus signed attribute of a CertRep (RFC 8894 §3.2.1.3)."""

    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


class FailInfo(IntEnum):
    """The failInfo signed attribute of a CertRep FAILURE (RFC 8894 §3.2.1.4)."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4


class Operation(StrEnum):
    """The value of the ``operation`` query parameter (RFC 8894 §4.1).

    The values are the exact spellings that real clients send.
    """

    GET_CA_CAPS = "GetCACaps"
    GET_CA_CERT = "GetCACert"
    GET_NEXT_CA_CERT = "GetNextCACert"
    PKI_OPERATION = "PKIOperation"


class DigestAlgorithm(StrEnum):
    """Message digests a client may sign a pkiMessage with.

    The values are OpenSSL's short names; the crypto layer maps OIDs onto
    them. Whether the weak ones are acceptable is a service policy
    (legacy switch), not a protocol rule.
    """

    MD5 = "md5"
    SHA1 = "sha1"
    SHA224 = "sha224"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"


class ContentCipher(StrEnum):
    """Content encryption of the pkcsPKIEnvelope (RFC 8894 §3.2.2).

    Values are OpenSSL cipher names. Single DES is only ever accepted
    behind the service's legacy switch.
    """

    DES_CBC = "des-cbc"
    DES_EDE3_CBC = "des-ede3-cbc"
    AES_128_CBC = "aes-128-cbc"
    AES_192_CBC = "aes-192-cbc"
    AES_256_CBC = "aes-256-cbc"


class KeyTransport(StrEnum):
    """How the content-encryption key reached us in the RecipientInfo."""

    RSA_PKCS1_V1_5 = "rsa-pkcs1-v1_5"
    RSA_OAEP = "rsa-oaep"


# Signed attribute OIDs (RFC 8894 §3.2.1, the table of SCEP attributes).
OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
# failInfoText is id-pkix 24.1 (RFC 8894 §3.2.1.4).
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"
