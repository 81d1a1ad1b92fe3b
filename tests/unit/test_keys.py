"""Key references in the config: URIs, the module, the PIN file (no token needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from scep_fast.runtime import config as configuration
from scep_fast.runtime.config import ConfigError
from scep_fast.runtime.keys import (
    KeyLoadError,
    TokenKeySource,
    check_uri,
    read_pin,
    uri_attributes,
)

URI = "pkcs11:token=scep;object=ca-key;type=private"
MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _config(tmp_path: Path, **pki: str) -> configuration.Config:
    lines = ["[pki]"] + [f'{key} = "{value}"' for key, value in pki.items()]
    return configuration.parse("\n".join(lines) + "\n", tmp_path)


def test_file_keys_stay_the_default(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert config.get("pki", "ca_key") == "ca.key"
    assert config.get("pki", "pkcs11_module") == ""


def test_a_key_uri_needs_the_module_and_the_pin_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pki.pkcs11_module: needed"):
        _config(tmp_path, ca_key=URI, pkcs11_pin_file="pin")
    with pytest.raises(ConfigError, match="pki.pkcs11_pin_file: needed"):
        _config(tmp_path, ra_key=URI, pkcs11_module=MODULE)
    config = _config(tmp_path, ca_key=URI, pkcs11_module=MODULE, pkcs11_pin_file="pin")
    assert config.get("pki", "ca_key") == URI


def test_the_module_path_is_absolute(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pki.pkcs11_module"):
        _config(tmp_path, ca_key=URI, pkcs11_module="libsofthsm2.so", pkcs11_pin_file="pin")


@pytest.mark.parametrize("uri", [
    "pkcs11:token=scep;object=ca;pin-value=1234",
    "pkcs11:token=scep;object=ca?pin-value=1234",
    "pkcs11:token=scep;object=ca?pin-source=file:/tmp/pin",
    "pkcs11:token=scep;object=ca?module-path=/tmp/evil.so",
    "pkcs11:token=scep",
    "pkcs11:token=scep;object=ca;type=public",
    "pkcs11:token=scep;objectca",
])
def test_uris_that_carry_secrets_or_name_no_private_key_are_refused(
        tmp_path: Path, uri: str) -> None:
    with pytest.raises(KeyLoadError):
        check_uri(uri)
    with pytest.raises(ConfigError, match="pki.ca_key"):
        _config(tmp_path, ca_key=uri, pkcs11_module=MODULE, pkcs11_pin_file="pin")


def test_uri_attributes_are_percent_decoded() -> None:
    attributes = uri_attributes("pkcs11:token=My%20Token;object=ca;id=%01%02")
    assert attributes == {"token": "My Token", "object": "ca", "id": "\x01\x02"}


def test_pin_file_must_be_0600(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("1234-5678\n")
    for mode in (0o640, 0o604, 0o644, 0o660):
        os.chmod(path, mode)
        with pytest.raises(KeyLoadError, match=f"{mode:04o}") as raised:
            read_pin(path)
        assert "1234" not in str(raised.value)
    os.chmod(path, 0o600)
    assert read_pin(path) == b"1234-5678"


def test_pin_file_must_hold_a_pin_and_be_a_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    with pytest.raises(KeyLoadError, match="no usable PIN"):
        read_pin(empty)
    link = tmp_path / "link"
    link.symlink_to(empty)
    with pytest.raises(KeyLoadError, match="cannot open"):
        read_pin(link)
    with pytest.raises(KeyLoadError, match="cannot open"):
        read_pin(tmp_path / "absent")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _source(outcomes: list[object], clock: _Clock, lost: list[int]) -> TokenKeySource:
    """A key source whose ``build`` raises or returns each of ``outcomes`` in turn."""

    def build() -> Any:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome, ()

    return TokenKeySource(build, on_lost=lambda: lost.append(1), retry_seconds=2.0,
                          replace_after_seconds=6.0, clock=clock)


def test_keys_that_come_later_are_used_and_tries_are_spaced() -> None:
    clock, lost = _Clock(), []
    context = object()
    source = _source([KeyLoadError("General Error"), context], clock, lost)
    assert source.context() is None
    clock.now += 1.0
    assert source.context() is None, "no new try before retry_seconds"
    clock.now += 1.5
    assert source.context() is context
    assert source.context() is context and lost == []


def test_a_refused_pin_is_tried_once() -> None:
    clock, lost = _Clock(), []
    outcomes: list[object] = [KeyLoadError("error:418000A0:PKCS#11 module::PIN incorrect")]
    source = _source(outcomes, clock, lost)
    assert source.context() is None
    for _ in range(5):
        clock.now += 10
        assert source.context() is None
    assert lost == [], "a new process would try the PIN again"


def test_keys_still_missing_replace_the_process_once() -> None:
    clock, lost = _Clock(), []
    outcomes: list[object] = [KeyLoadError("object not found") for _ in range(10)]
    source = _source(outcomes, clock, lost)
    for _ in range(3):
        assert source.context() is None
        clock.now += 2.5
    assert source.context() is None
    assert lost == [1]
    clock.now += 10
    assert source.context() is None and lost == [1]
