"""docs/webhook.schema.json and docs/webhook.openapi.yaml against what the code sends.

Neither jsonschema nor PyYAML is a dependency: a small checker below covers
the keywords the schema uses, and the OpenAPI file is checked for its
references and header names as text.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from scep_fast.runtime import webhook
from scep_fast.service.notices import EVENTS, issued_event, refused_event, revoked_event
from scep_fast.service.validation import ValidationRequest
from tests.ledger_values import make_record

DOCS = Path(__file__).resolve().parents[2] / "docs"
SCHEMA: dict[str, Any] = json.loads((DOCS / "webhook.schema.json").read_text())
OPENAPI = (DOCS / "webhook.openapi.yaml").read_text()
DEFS: dict[str, Any] = SCHEMA["$defs"]

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,), "array": (list,), "string": (str,), "boolean": (bool,),
    "integer": (int,), "number": (int, float),
}
_HANDLED = {"title", "description", "type", "required", "properties", "items", "const", "enum",
            "maxLength", "minimum", "maximum", "pattern", "oneOf", "$ref", "contentEncoding"}


def errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """What is wrong with ``value`` by ``schema``; an unknown keyword is an error
    in the schema (this checker would silently skip it)."""
    unknown = set(schema) - _HANDLED
    if unknown:
        return [f"{where}: keyword(s) {sorted(unknown)} not checked"]
    if "$ref" in schema:
        return errors(value, DEFS[schema["$ref"].removeprefix("#/$defs/")], where)
    if "oneOf" in schema:
        matching = [s for s in schema["oneOf"] if not errors(value, s, where)]
        return [] if len(matching) == 1 else [f"{where}: matches {len(matching)} of oneOf"]
    found: list[str] = []
    kind = schema.get("type")
    # bool is an int in Python, not an integer in JSON.
    if kind is not None and (not isinstance(value, _TYPES[kind])
                             or (kind != "boolean" and type(value) is bool)):
        return [f"{where}: {value!r} is not {kind}"]
    if "const" in schema and value != schema["const"]:
        found.append(f"{where}: {value!r} is not {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not in {schema['enum']}")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        found.append(f"{where}: too long")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{where}: below minimum")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{where}: above maximum")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{where}: {value!r} does not match {schema['pattern']}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        found += [f"{where}: {key} missing" for key in schema.get("required", [])
                  if key not in value]
        found += [f"{where}: {key} not declared" for key in value if key not in properties]
        for key, item in value.items():
            if key in properties:
                found += errors(item, properties[key], f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += errors(item, schema["items"], f"{where}[{i}]")
    return found


RECORD = make_record(0xA1B2C3, "tx-schema")
DOCUMENTS = {
    "IssuedEvent": json.loads(issued_event(RECORD, message_type="PKCSReq", csr_der=b"\x30\x00",
                                           at=1_750_000_000.5)),
    "RefusedEvent": json.loads(refused_event(
        transaction_id="tx-r", message_type="RenewalReq", csr_der=b"\x30\x00",
        fail_info="badRequest", reason="profile does not accept dsa keys", profile="default",
        at=1_750_000_000.25)),
    "RevokedEvent": json.loads(revoked_event(RECORD, reason=1, at=1_750_000_001.0)),
    "ValidationRequest": webhook.request_document(ValidationRequest(
        transaction_id="tx-v", message_type="RenewalReq", csr_der=b"\x30\x00",
        subject="CN=a", sans=("dns_name:a.example",), challenge="c", signer_der=b"\x30\x01",
        profile="p", renewal=True)),
}


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_what_the_code_sends_is_what_the_schema_says(name: str) -> None:
    document = DOCUMENTS[name]
    definition = DEFS[name]
    assert errors(document, definition) == []
    # Every declared property is sent, and the schema requires them all (none
    # is optional in the code): a property dropped from either side shows.
    assert set(definition["properties"]) == set(document) == set(definition["required"])


def test_the_event_definition_tells_the_three_events_apart() -> None:
    for name in ("IssuedEvent", "RefusedEvent", "RevokedEvent"):
        assert errors(DOCUMENTS[name], DEFS["Event"]) == []
        assert DEFS[name]["properties"]["event"]["const"] in EVENTS
    wrong = {**DOCUMENTS["IssuedEvent"], "event": "refused"}
    assert errors(wrong, DEFS["Event"])
    assert errors({**DOCUMENTS["RevokedEvent"], "revocation_reason": "1"}, DEFS["Event"])


def test_the_answer_schema_is_what_the_parser_takes() -> None:
    answer = DEFS["ValidationAnswer"]
    assert answer["required"] == ["allow"]
    assert answer["properties"]["reason"]["maxLength"] == webhook.MAX_REASON_CHARS
    assert answer["properties"]["profile"]["maxLength"] == webhook.MAX_PROFILE_CHARS
    for example in ({"allow": True}, {"allow": False, "reason": "r"}, {"allow": True,
                                                                        "profile": "p"}):
        assert errors(example, answer) == []
        webhook.parse_answer(json.dumps(example).encode())
    assert errors({"allow": "true"}, answer)


def test_the_openapi_file_refers_to_what_exists() -> None:
    assert OPENAPI.startswith("openapi: 3.1.")
    refs = re.findall(r"\$ref: '([^']*)'", OPENAPI)
    assert len(refs) >= 10
    for ref in refs:
        document, _, pointer = ref.partition("#")
        if document:
            assert document == "webhook.schema.json"
            assert pointer.removeprefix("/$defs/") in DEFS, ref
        else:
            # A local component: "#/components/<kind>/<Name>" is defined once
            # under its kind (indentation 4 for the name).
            _, _, kind, name = pointer.split("/")
            section = OPENAPI.split(f"\n  {kind}:\n", 1)[1]
            section = re.split(r"\n  \S", section, maxsplit=1)[0]
            assert re.search(rf"^    {name}:$", section, re.M), ref
    for header in (webhook.TIMESTAMP_HEADER, webhook.SIGNATURE_HEADER, webhook.DELIVERY_HEADER,
                   webhook.EVENT_HEADER):
        assert f"name: {header}" in OPENAPI


def test_the_documented_signature_pattern_matches_what_sign_makes() -> None:
    signature = webhook.sign(b"s" * 16, 1_750_000_000, "00", b"{}")
    assert re.fullmatch(r"v1=[0-9a-f]{64}", signature)
    assert "'^v1=[0-9a-f]{64}$'" in OPENAPI
