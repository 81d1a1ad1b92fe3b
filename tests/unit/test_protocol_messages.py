"""Typed pkiMessage fields: request attributes and CertRep parameters."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from scep_fast.protocol import (
    MAX_FAIL_INFO_TEXT_BYTES,
    MAX_TRANSACTION_ID_CHARS,
    OID_FAIL_INFO,
    OID_FAIL_INFO_TEXT,
    OID_MESSAGE_TYPE,
    OID_PKI_STATUS,
    OID_RECIPIENT_NONCE,
    OID_SENDER_NONCE,
    OID_TRANSACTION_ID,
    REQUEST_MESSAGE_TYPES,
    BadAlg,
    BadCertId,
    BadTime,
    CertRepParams,
    ContentCipher,
    DigestAlgorithm,
    FailInfo,
    InternalError,
    KeyTransport,
    MalformedRequest,
    MessageType,
    Operation,
    PKIStatus,
    ScepRequestMessage,
    from_raw_attributes,
)

# sscep-style transaction ID: hex MD5 of the public key.
TID = "5A9F2B0C4D1E3F60718293A4B5C6D7E8"
NONCE = bytes(range(16))
ALGS: dict[str, Any] = {
    "digest_algorithm": "sha256",
    "content_cipher": "aes-128-cbc",
    "key_transport": "rsa-pkcs1-v1_5",
}


def raw(
    message_type: str | int | bytes = "19",
    transaction_id: bytes | str = TID.encode(),
    sender_nonce: bytes = NONCE,
    **overrides: Any,
) -> ScepRequestMessage:
    return from_raw_attributes(message_type, transaction_id, sender_nonce, **{**ALGS, **overrides})


# --- enums ---------------------------------------------------------------------------


def test_enum_values_are_rfc_numbers() -> None:
    assert {m.name: m.value for m in MessageType} == {
        "CERT_REP": 3,
        "RENEWAL_REQ": 17,
        "PKCS_REQ": 19,
        "CERT_POLL": 20,
        "GET_CERT": 21,
        "GET_CRL": 22,
    }
    assert {s.name: s.value for s in PKIStatus} == {"SUCCESS": 0, "FAILURE": 2, "PENDING": 3}
    assert [f.value for f in FailInfo] == [0, 1, 2, 3, 4]
    assert int(FailInfo.BAD_MESSAGE_CHECK) == 1
    assert [op.value for op in Operation] == [
        "GetCACaps",
        "GetCACert",
        "GetNextCACert",
        "PKIOperation",
    ]
    assert Operation("PKIOperation") == "PKIOperation"
    assert MessageType.CERT_REP not in REQUEST_MESSAGE_TYPES
    assert len(REQUEST_MESSAGE_TYPES) == 5


def test_attribute_oids() -> None:
    prefix = "2.16.840.1.113733.1.9."
    actual = {
        "messageType": OID_MESSAGE_TYPE,
        "pkiStatus": OID_PKI_STATUS,
        "failInfo": OID_FAIL_INFO,
        "senderNonce": OID_SENDER_NONCE,
        "recipientNonce": OID_RECIPIENT_NONCE,
        "transactionID": OID_TRANSACTION_ID,
        "failInfoText": OID_FAIL_INFO_TEXT,
    }
    assert actual == {
        "messageType": prefix + "2",
        "pkiStatus": prefix + "3",
        "failInfo": prefix + "4",
        "senderNonce": prefix + "5",
        "recipientNonce": prefix + "6",
        "transactionID": prefix + "7",
        "failInfoText": "1.3.6.1.5.5.7.24.1",
    }


# --- from_raw_attributes ---------------------------------------------------------------


def test_pkcsreq_from_raw_attributes() -> None:
    message = raw()
    assert message == ScepRequestMessage(
        message_type=MessageType.PKCS_REQ,
        transaction_id=TID,
        sender_nonce=NONCE,
        digest_algorithm=DigestAlgorithm.SHA256,
        content_cipher=ContentCipher.AES_128_CBC,
        key_transport=KeyTransport.RSA_PKCS1_V1_5,
    )
    assert message.message_type is MessageType.PKCS_REQ


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("17", MessageType.RENEWAL_REQ),
        ("19", MessageType.PKCS_REQ),
        ("20", MessageType.CERT_POLL),
        ("21", MessageType.GET_CERT),
        ("22", MessageType.GET_CRL),
        (b"20", MessageType.CERT_POLL),
        (21, MessageType.GET_CERT),
        (MessageType.GET_CRL, MessageType.GET_CRL),
    ],
)
def test_message_types(value: str | int | bytes, expected: MessageType) -> None:
    assert raw(value).message_type is expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("3", "not a request"),  # CertRep comes from the CA only
        (3, "not a request"),
        ("99", "unknown messageType"),
        ("0", "unknown messageType"),
        ("18", "unknown messageType"),
        ("", "not a decimal"),
        ("PKCSReq", "not a decimal"),
        (" 19", "not a decimal"),
        ("19\x00", "not a decimal"),
        ("+19", "not a decimal"),
        ("\u0661\u0669", "not a decimal"),  # Arabic-Indic digits for 19
        ("1900", "not a decimal"),
        (b"\xff", "not a decimal"),
    ],
)
def test_bad_message_types(value: str | int | bytes, reason: str) -> None:
    with pytest.raises(MalformedRequest, match=reason) as info:
        raw(value)
    assert info.value.http_status == 400


def test_bool_message_type_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        raw(True)


@pytest.mark.parametrize(
    "tid",
    [
        TID,
        "2F3C6B5A1E0D4F8799AA1BCC2DDE3FF04A5B6C7D",  # Apple-style hex SHA-1
        "a/B+c=d:e.f,g-h(i)j'k?l m",  # every PrintableString punctuation mark
        "x",
        "A" * MAX_TRANSACTION_ID_CHARS,
    ],
)
def test_good_transaction_ids(tid: str) -> None:
    assert raw(transaction_id=tid.encode()).transaction_id == tid
    assert raw(transaction_id=tid).transaction_id == tid


@pytest.mark.parametrize(
    "tid",
    [
        b"",
        b"A" * (MAX_TRANSACTION_ID_CHARS + 1),
        b"under_score",
        b"at@sign",
        b"star*",
        b"semi;colon",
        b"new\nline",
        b"caf\xc3\xa9",
        b"\xff\xfe",
    ],
)
def test_bad_transaction_ids(tid: bytes) -> None:
    with pytest.raises(MalformedRequest, match="transactionID"):
        raw(transaction_id=tid)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
def test_nonce_sizes_accepted(size: int) -> None:
    # Quirk(iOS): older versions send 8-byte nonces.
    assert raw(sender_nonce=bytes(size)).sender_nonce == bytes(size)


@pytest.mark.parametrize("size", [0, 1, 7, 65, 1000])
def test_nonce_sizes_refused(size: int) -> None:
    with pytest.raises(MalformedRequest, match="senderNonce"):
        raw(sender_nonce=bytes(size))


def test_algorithm_names_are_case_insensitive_and_accept_enums() -> None:
    message = raw(
        digest_algorithm="SHA512",
        content_cipher=ContentCipher.DES_EDE3_CBC,
        key_transport="RSA-OAEP",
    )
    assert message.digest_algorithm is DigestAlgorithm.SHA512
    assert message.content_cipher is ContentCipher.DES_EDE3_CBC
    assert message.key_transport is KeyTransport.RSA_OAEP


@pytest.mark.parametrize(
    "override",
    [
        {"digest_algorithm": "whirlpool"},
        {"content_cipher": "rc2-cbc"},
        {"key_transport": "rsa-kem"},
    ],
)
def test_unknown_algorithms_are_bad_alg(override: dict[str, Any]) -> None:
    with pytest.raises(BadAlg) as info:
        raw(**override)
    assert info.value.fail_info is FailInfo.BAD_ALG
    assert info.value.http_status is None


def test_attribute_errors_win_over_algorithm_errors() -> None:
    # BadAlg promises an answerable request: checked only once the
    # transactionID and nonce are known to be good.
    with pytest.raises(MalformedRequest):
        raw(transaction_id=b"", digest_algorithm="whirlpool")
    with pytest.raises(MalformedRequest):
        raw(sender_nonce=b"short", content_cipher="rc2-cbc")


def test_direct_construction_validates() -> None:
    good = raw()
    with pytest.raises(MalformedRequest, match="not a request"):
        dataclasses.replace(good, message_type=MessageType.CERT_REP)
    with pytest.raises(MalformedRequest, match="transactionID"):
        dataclasses.replace(good, transaction_id="bad_id")
    with pytest.raises(MalformedRequest, match="senderNonce"):
        dataclasses.replace(good, sender_nonce=b"1234567")
    with pytest.raises(TypeError):
        dataclasses.replace(good, digest_algorithm="sha256")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        dataclasses.replace(good, message_type=19)  # type: ignore[arg-type]


def test_request_message_is_frozen_and_slotted() -> None:
    message = raw()
    assert not hasattr(message, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        message.transaction_id = "other"  # type: ignore[misc]


# --- CertRepParams -------------------------------------------------------------------------


@pytest.mark.parametrize("status", [PKIStatus.SUCCESS, PKIStatus.PENDING])
def test_success_and_pending_have_no_fail_info(status: PKIStatus) -> None:
    params = CertRepParams(status, TID, NONCE)
    assert params.fail_info is None
    with pytest.raises(InternalError) as info:
        CertRepParams(status, TID, NONCE, fail_info=FailInfo.BAD_REQUEST)
    assert "failInfo is only for FAILURE" in info.value.detail
    with pytest.raises(InternalError) as info:
        CertRepParams(status, TID, NONCE, fail_info_text="why")
    assert "failInfoText is only for FAILURE" in info.value.detail


def test_failure_needs_fail_info() -> None:
    with pytest.raises(InternalError) as info:
        CertRepParams(PKIStatus.FAILURE, TID, NONCE)
    assert "needs a failInfo" in info.value.detail
    assert info.value.http_status == 500
    params = CertRepParams(
        PKIStatus.FAILURE, TID, NONCE, FailInfo.BAD_REQUEST, "challenge password wrong"
    )
    assert params.fail_info is FailInfo.BAD_REQUEST
    assert params.fail_info_text == "challenge password wrong"


def test_fail_info_text_rules() -> None:
    def failure(text: str) -> CertRepParams:
        return CertRepParams(PKIStatus.FAILURE, TID, NONCE, FailInfo.BAD_REQUEST, text)

    # UTF-8 is fine, up to the byte limit (2 bytes per "é").
    assert failure("\u00e9" * (MAX_FAIL_INFO_TEXT_BYTES // 2)).fail_info_text
    with pytest.raises(InternalError, match="internal error") as info:
        failure("\u00e9" * (MAX_FAIL_INFO_TEXT_BYTES // 2 + 1))
    assert "too long" in info.value.detail
    with pytest.raises(InternalError) as info:
        failure("\ud800")  # a lone surrogate cannot be UTF-8
    assert "UTF-8" in info.value.detail
    with pytest.raises(InternalError):
        failure("")


@pytest.mark.parametrize(
    ("tid", "nonce"),
    [("", NONCE), ("bad_id", NONCE), (TID, b""), (TID, bytes(7)), (TID, bytes(65))],
)
def test_cert_rep_echo_values_are_checked(tid: str, nonce: bytes) -> None:
    with pytest.raises(InternalError):
        CertRepParams(PKIStatus.PENDING, tid, nonce)


def test_cert_rep_types_are_checked() -> None:
    with pytest.raises(TypeError):
        CertRepParams(0, TID, NONCE)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        CertRepParams(PKIStatus.FAILURE, TID, NONCE, 2)  # type: ignore[arg-type]


def test_reply_to_echoes_transaction_id_and_nonce() -> None:
    request = raw(sender_nonce=bytes(range(8)))
    params = CertRepParams.reply_to(request, PKIStatus.PENDING)
    assert params.transaction_id == request.transaction_id
    # The recipientNonce is the client's senderNonce, same length (8 here).
    assert params.recipient_nonce == bytes(range(8))
    assert params.status is PKIStatus.PENDING


@pytest.mark.parametrize(
    ("error", "fail_info"),
    [
        (BadTime("signingTime too far off"), FailInfo.BAD_TIME),
        (BadCertId(), FailInfo.BAD_CERT_ID),
        (BadAlg(), FailInfo.BAD_ALG),
    ],
)
def test_failure_from_message_error(
    error: BadTime | BadCertId | BadAlg, fail_info: FailInfo
) -> None:
    params = CertRepParams.failure(raw(), error)
    assert params.status is PKIStatus.FAILURE
    assert params.fail_info is fail_info
    assert params.fail_info_text == str(error)
    assert params.recipient_nonce == NONCE


def test_cert_rep_params_frozen_and_slotted() -> None:
    params = CertRepParams(PKIStatus.SUCCESS, TID, NONCE)
    assert not hasattr(params, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.status = PKIStatus.FAILURE  # type: ignore[misc]
