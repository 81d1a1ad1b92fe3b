"""parse_request: every GET base64 dialect, POST, limits, errors, fuzzing."""

from __future__ import annotations

import base64
import dataclasses
import random
from urllib.parse import quote_from_bytes

import pytest

from scep_fast.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CA_IDENT_CHARS,
    BodyTooLarge,
    GetCACaps,
    GetCACert,
    GetNextCACert,
    MalformedRequest,
    MethodNotAllowed,
    Operation,
    PKIOperation,
    ScepError,
    UnknownOperation,
    parse_request,
)

# A stand-in pkiMessage: every byte value, so its base64 holds "+", "/" and,
# at 1024 bytes (1024 % 3 == 1), "==" padding.
DER = bytes(range(256)) * 4
B64 = base64.b64encode(DER)


def test_fixture_exercises_the_awkward_characters() -> None:
    assert b"+" in B64
    assert b"/" in B64
    assert B64.endswith(b"==")


def get_pki(message: bytes, **kwargs: int) -> PKIOperation:
    result = parse_request("GET", b"operation=PKIOperation&message=" + message, b"", **kwargs)
    assert isinstance(result, PKIOperation)
    return result


def wrap(data: bytes, width: int = 64) -> list[bytes]:
    return [data[i : i + width] for i in range(0, len(data), width)]


# --- GET dialects ----------------------------------------------------------------

DIALECTS: dict[str, bytes] = {
    # RFC 8894 §4.1: base64, then every reserved character escaped.
    "fully_escaped": quote_from_bytes(B64, safe="").encode(),
    # Quirk(macOS): raw "+" and "/", only "=" escaped.
    "only_padding_escaped": B64.replace(b"=", b"%3D"),
    # Lower-case hex in escapes is equally valid (RFC 3986 §2.1).
    "lowercase_escapes": B64.replace(b"+", b"%2b").replace(b"/", b"%2f").replace(b"=", b"%3d"),
    # A form encoder turned "+" into a space, raw or escaped.
    "plus_as_escaped_space": B64.replace(b"+", b"%20"),
    "plus_as_raw_space": B64.replace(b"+", b" "),
    # Nothing escaped at all.
    "raw_base64": B64,
    # Quirk(Cisco IOS): 64-column lines with escaped LF, escaped reserved chars.
    "wrapped_lf_escaped": b"%0A".join(
        quote_from_bytes(line, safe="").encode() for line in wrap(B64)
    ),
    "wrapped_crlf_escaped": b"%0D%0A".join(wrap(B64)) + b"%0D%0A",
    "wrapped_raw_newlines": b"\r\n".join(wrap(B64)) + b"\n",
    "wrapped_76_with_tabs": b"%0A%09".join(wrap(B64, 76)),
    # URL-safe alphabet (RFC 4648 §5), with and without padding.
    "urlsafe_padded": base64.urlsafe_b64encode(DER),
    "urlsafe_unpadded": base64.urlsafe_b64encode(DER).rstrip(b"="),
    # Padding left out altogether.
    "no_padding": B64.rstrip(b"="),
    "no_padding_escaped": quote_from_bytes(B64.rstrip(b"="), safe="").encode(),
}


@pytest.mark.parametrize("name", sorted(DIALECTS))
def test_get_pkioperation_dialects_decode_to_the_same_der(name: str) -> None:
    result = get_pki(DIALECTS[name])
    assert result.message == DER
    assert result.via_get is True
    assert result.operation is Operation.PKI_OPERATION


def test_form_decoding_would_have_broken_the_raw_plus_dialect() -> None:
    # The reason the query is parsed by hand: a "+" that form decoding
    # turns into a space must still come back as "+".
    from urllib.parse import parse_qs

    naive = parse_qs("message=" + B64.decode())["message"][0].encode()
    assert naive != B64
    assert get_pki(B64).message == DER


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 300, 1000, 1001, 1002])
def test_every_padding_length_round_trips(size: int) -> None:
    der = bytes((i * 7 + 3) % 256 for i in range(size))
    encoded = base64.b64encode(der)
    assert get_pki(encoded).message == der
    assert get_pki(encoded.rstrip(b"=")).message == der
    assert get_pki(base64.urlsafe_b64encode(der).rstrip(b"=")).message == der


def test_message_parameter_may_come_first_and_other_parameters_are_ignored() -> None:
    query = b"message=" + DIALECTS["fully_escaped"] + b"&foo=bar&operation=PKIOperation&&x"
    result = parse_request("GET", query, b"")
    assert result == PKIOperation(message=DER, via_get=True)


def test_get_ignores_a_body() -> None:
    result = get_pki(B64)
    assert result.message == DER
    other = parse_request("GET", b"operation=PKIOperation&message=" + B64, b"junk body")
    assert isinstance(other, PKIOperation)
    assert other.message == DER


# --- GET errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        b"",
        b"%3D%3D",  # padding only
        b"%0A%0D",  # white space only
        b"QUJD!",  # "!" is outside every base64 alphabet
        b"QUJD%ZZ",  # a broken escape stays a "%"
        b"QQ%3D%3DQUJD",  # padding in the middle
        b"QUJDR",  # 5 characters: no valid base64 length
        b"QUJD%00",  # NUL byte
        b"QUJD%FF",  # non-ASCII byte
    ],
)
def test_bad_get_message_is_malformed(message: bytes) -> None:
    with pytest.raises(MalformedRequest) as info:
        get_pki(message)
    assert info.value.http_status == 400


def test_get_pkioperation_without_message_is_malformed() -> None:
    with pytest.raises(MalformedRequest, match="message"):
        parse_request("GET", b"operation=PKIOperation", b"")


def test_duplicate_message_is_refused() -> None:
    query = b"operation=PKIOperation&message=" + B64 + b"&message=" + B64
    with pytest.raises(MalformedRequest, match="more than one message"):
        parse_request("GET", query, b"")


def test_get_decoded_size_limit() -> None:
    assert get_pki(B64, max_message_bytes=len(DER)).message == DER
    with pytest.raises(BodyTooLarge) as info:
        get_pki(B64, max_message_bytes=len(DER) - 1)
    assert info.value.http_status == 413
    # The limit applies to decoded bytes, not to the escaped text.
    escaped = DIALECTS["wrapped_lf_escaped"]
    assert len(escaped) > len(DER) + 100
    assert get_pki(escaped, max_message_bytes=len(DER)).message == DER


def test_default_limit_is_256_kib() -> None:
    assert DEFAULT_MAX_MESSAGE_BYTES == 256 * 1024
    big = bytes(DEFAULT_MAX_MESSAGE_BYTES + 1)
    with pytest.raises(BodyTooLarge):
        get_pki(base64.b64encode(big))
    with pytest.raises(BodyTooLarge):
        parse_request("POST", b"operation=PKIOperation", big)


# --- POST -------------------------------------------------------------------------------


def test_post_body_is_the_message() -> None:
    result = parse_request("POST", b"operation=PKIOperation", DER)
    assert result == PKIOperation(message=DER, via_get=False)


@pytest.mark.parametrize(
    "query",
    [
        b"operation=PKIOperation&message=" + B64,
        b"operation=PKIOperation&message=not-base64!!!",
        b"operation=PKIOperation&message=a&message=b",
        b"message=%ZZ&operation=PKIOperation",
    ],
)
def test_post_ignores_message_in_query(query: bytes) -> None:
    body = b"\x30\x80the body wins"
    result = parse_request("POST", query, body)
    assert isinstance(result, PKIOperation)
    assert result.message == body
    assert result.via_get is False


def test_post_empty_body_is_malformed_even_with_a_query_message() -> None:
    with pytest.raises(MalformedRequest, match="empty"):
        parse_request("POST", b"operation=PKIOperation&message=" + B64, b"")


def test_post_size_limit() -> None:
    assert parse_request("POST", b"operation=PKIOperation", DER, max_message_bytes=len(DER))
    with pytest.raises(BodyTooLarge) as info:
        parse_request("POST", b"operation=PKIOperation", DER, max_message_bytes=len(DER) - 1)
    assert info.value.http_status == 413


# --- operation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"operation=GetCACaps", GetCACaps("")),
        (b"operation=GetCACert", GetCACert("")),
        (b"operation=GetNextCACert", GetNextCACert("")),
        (b"operation=GetCACert&message=", GetCACert("")),
        (b"operation=GetCACert&message=My+CA", GetCACert("My CA")),
        (b"operation=GetCACert&message=My%20CA%2B1", GetCACert("My CA+1")),
        (b"operation=GetCACaps&message=ca%C3%A9", GetCACaps("ca\u00e9")),
        (b"message=trustpoint1&operation=GetNextCACert", GetNextCACert("trustpoint1")),
        # Values are matched without regard to case; names are not.
        (b"operation=getcacert", GetCACert("")),
        (b"operation=GETCACAPS", GetCACaps("")),
        (b"operation=+GetCACert+", GetCACert("")),
    ],
)
def test_ca_operations(query: bytes, expected: object) -> None:
    result = parse_request("GET", query, b"")
    assert result == expected
    assert type(result) is type(expected)


def test_ca_ident_is_not_base64_decoded() -> None:
    # "QUJD" is base64 for "ABC"; as a CA name it must stay "QUJD".
    result = parse_request("GET", b"operation=GetCACert&message=QUJD", b"")
    assert result == GetCACert("QUJD")


def test_lowercase_pkioperation_value_is_accepted() -> None:
    result = parse_request("GET", b"operation=pkioperation&message=" + B64, b"")
    assert isinstance(result, PKIOperation)
    assert result.message == DER


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
def test_read_only_operations_accept_get_post_head(method: str) -> None:
    assert parse_request(method, b"operation=GetCACert&message=x", b"ignored") == GetCACert("x")
    assert parse_request(method, b"operation=GetCACaps", b"") == GetCACaps("")


@pytest.mark.parametrize(
    "query",
    [b"", b"message=abc", b"Operation=GetCACert", b"OPERATION=GetCACert", b"op=GetCACert"],
)
def test_missing_operation(query: bytes) -> None:
    with pytest.raises(MalformedRequest, match="missing operation") as info:
        parse_request("GET", query, b"")
    assert info.value.http_status == 400
    assert not isinstance(info.value, UnknownOperation)


@pytest.mark.parametrize(
    "value", [b"", b"GetCRL", b"PKIOperationX", b"GetCACertChain", b"%FF%FE", b"Get%00CACert"]
)
def test_unknown_operation(value: bytes) -> None:
    with pytest.raises(UnknownOperation) as info:
        parse_request("GET", b"operation=" + value, b"")
    assert isinstance(info.value, MalformedRequest)
    assert info.value.http_status == 400
    assert "unknown operation" in str(info.value)


def test_unknown_operation_reason_is_bounded_and_printable() -> None:
    with pytest.raises(UnknownOperation) as info:
        parse_request("GET", b"operation=" + b"A" * 5000 + b"%0D%0AX-Evil:%201", b"")
    reason = str(info.value)
    assert len(reason) < 100
    assert "\r" not in reason
    assert "\n" not in reason


def test_duplicate_operation_is_refused() -> None:
    with pytest.raises(MalformedRequest, match="more than one operation"):
        parse_request("GET", b"operation=GetCACert&operation=PKIOperation", b"")


@pytest.mark.parametrize(
    "query",
    [
        b"operation=GetCACert&message=%FF",  # not UTF-8
        b"operation=GetCACert&message=a%0Ab",  # control character
        b"operation=GetCACaps&message=%1B%5B31m",  # terminal escape
        b"operation=GetCACert&message=" + b"a" * (MAX_CA_IDENT_CHARS + 1),
    ],
)
def test_bad_ca_ident(query: bytes) -> None:
    with pytest.raises(MalformedRequest):
        parse_request("GET", query, b"")


def test_longest_ca_ident_is_accepted() -> None:
    query = b"operation=GetCACert&message=" + b"a" * MAX_CA_IDENT_CHARS
    assert parse_request("GET", query, b"") == GetCACert("a" * MAX_CA_IDENT_CHARS)


# --- methods ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["PUT", "DELETE", "OPTIONS", "PATCH", "get", "Post", ""])
def test_other_methods_are_refused_with_405(method: str) -> None:
    with pytest.raises(MethodNotAllowed) as info:
        parse_request(method, b"operation=GetCACert", b"")
    assert info.value.http_status == 405
    assert "GET" in info.value.allowed
    assert "POST" in info.value.allowed


def test_head_pkioperation_is_refused() -> None:
    with pytest.raises(MethodNotAllowed) as info:
        parse_request("HEAD", b"operation=PKIOperation&message=" + B64, b"")
    assert info.value.http_status == 405
    assert info.value.allowed == ("GET", "POST")


def test_method_is_checked_before_the_query() -> None:
    with pytest.raises(MethodNotAllowed):
        parse_request("PUT", b"", b"")


def test_bad_arguments_are_programming_errors() -> None:
    with pytest.raises(ValueError, match="max_message_bytes"):
        parse_request("GET", b"operation=GetCACaps", b"", max_message_bytes=0)
    with pytest.raises(TypeError):
        parse_request("GET", "operation=GetCACaps", b"")  # type: ignore[arg-type]


# --- request types ----------------------------------------------------------------------


def test_request_types_are_frozen_and_slotted() -> None:
    for value in (GetCACaps("a"), GetCACert("a"), GetNextCACert("a")):
        assert not hasattr(value, "__dict__")
        with pytest.raises(dataclasses.FrozenInstanceError):
            value.ca_ident = "b"  # type: ignore[misc]
    pki = PKIOperation(DER, True)
    assert not hasattr(pki, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        pki.message = b"other"  # type: ignore[misc]


def test_request_types_carry_their_operation() -> None:
    assert GetCACaps.operation is Operation.GET_CA_CAPS
    assert GetCACert.operation is Operation.GET_CA_CERT
    assert GetNextCACert.operation is Operation.GET_NEXT_CA_CERT
    assert PKIOperation.operation is Operation.PKI_OPERATION
    caps: object = GetCACaps("x")
    assert caps != GetCACert("x")


def test_request_types_validate() -> None:
    with pytest.raises(MalformedRequest):
        PKIOperation(b"", via_get=False)
    with pytest.raises(TypeError):
        PKIOperation("text", via_get=False)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        PKIOperation(DER, via_get=1)  # type: ignore[arg-type]
    with pytest.raises(MalformedRequest):
        GetCACert("a\x00b")
    with pytest.raises(TypeError):
        GetCACaps(b"bytes")  # type: ignore[arg-type]


# --- fuzzing ------------------------------------------------------------------------------

_TOKENS = [
    b"operation",
    b"message",
    b"Operation",
    b"=",
    b"&",
    b"PKIOperation",
    b"GetCACert",
    b"GetCACaps",
    b"GetNextCACert",
    b"getcacaps",
    b"%",
    b"%3D",
    b"%2B",
    b"%0A",
    b"%ZZ",
    b"%C3%A9",
    b"%FF",
    b"%00",
    b"+",
    b"/",
    b"-",
    b"_",
    b" ",
    b"\r\n",
    b"==",
    b"QUJD",
    b"MIIB",
    B64[:64],
]


def _random_query(rng: random.Random) -> bytes:
    kind = rng.random()
    if kind < 0.15:
        return rng.randbytes(rng.randrange(0, 200))
    parts = [rng.choice(_TOKENS) for _ in range(rng.randrange(0, 12))]
    if kind < 0.6:
        op = rng.choice([b"PKIOperation", b"GetCACert", b"GetCACaps", b"GetNextCACert"])
        parts.insert(0, b"operation=" + op + b"&message=")
    return b"".join(parts)


def test_fuzz_parses_or_raises_scep_error_only() -> None:
    rng = random.Random(8894)
    methods = ["GET", "GET", "POST", "POST", "HEAD", "PUT", "get", ""]
    outcomes: dict[str, int] = {}
    for _ in range(2000):
        method = rng.choice(methods)
        query = _random_query(rng)
        body = rng.randbytes(rng.randrange(0, 64)) if rng.random() < 0.7 else b""
        limit = rng.choice([1, 16, 64, DEFAULT_MAX_MESSAGE_BYTES])
        try:
            result = parse_request(method, query, body, max_message_bytes=limit)
        except ScepError as error:
            # Every refusal suggests an HTTP status and a short, clean reason.
            assert error.http_status in {400, 405, 413}
            assert 0 < len(str(error)) <= 200
            assert str(error).isprintable()
            outcomes[type(error).__name__] = outcomes.get(type(error).__name__, 0) + 1
            continue
        assert isinstance(result, GetCACaps | GetCACert | GetNextCACert | PKIOperation)
        if isinstance(result, PKIOperation):
            assert 0 < len(result.message) <= limit
            assert result.via_get is (method == "GET")
        outcomes[type(result).__name__] = outcomes.get(type(result).__name__, 0) + 1
    # The generator must reach both the happy paths and the refusals.
    for name in ("PKIOperation", "GetCACert", "MalformedRequest", "MethodNotAllowed"):
        assert outcomes.get(name, 0) > 10, outcomes
