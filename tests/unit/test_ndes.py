"""The NDES page's credentials file, its Basic check and its page bytes (no sockets)."""

from __future__ import annotations

import base64
import codecs
import os
import re
from pathlib import Path

import pytest

from scep_fast.runtime.config import ConfigError, parse
from scep_fast.runtime.ndes import (
    NdesCredentialsError,
    basic_user,
    cache_full_page,
    challenge_page,
    is_page_path,
    load_credentials,
)

PASSWORD = "0123456789abcdef-long-enough"


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "ndes-credentials"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_each_line_is_a_credential_and_any_one_opens_the_page(tmp_path: Path) -> None:
    creds = load_credentials(_file(tmp_path, f"# two MDMs\n\nfleet:{PASSWORD}\n"
                                             f"jamf:{PASSWORD}:with:colons\n"))
    assert len(creds) == 2
    assert basic_user(_basic("fleet", PASSWORD), creds) == "fleet"
    assert basic_user(_basic("jamf", PASSWORD + ":with:colons"), creds) == "jamf"
    assert basic_user("basic " + _basic("fleet", PASSWORD).split()[1], creds) == "fleet"
    for wrong in (_basic("fleet", PASSWORD + "x"), _basic("jamf", PASSWORD),
                  _basic("FLEET", PASSWORD), "Basic", "Basic ###", "Bearer " + PASSWORD, "",
                  None, "Basic " + base64.b64encode(b"no-colon").decode(),
                  "Basic " + base64.b64encode(b"\xff:\xfe").decode()):
        assert basic_user(wrong, creds) is None


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_file_others_may_read_is_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(NdesCredentialsError, match=f"mode {mode:04o}.*chmod 600") as refused:
        load_credentials(_file(tmp_path, f"fleet:{PASSWORD}\n", mode))
    assert PASSWORD not in str(refused.value)


@pytest.mark.parametrize(("text", "why"), [
    ("", "no USER:PASSWORD"),
    ("# only a comment\n", "no USER:PASSWORD"),
    (f"no-colon-{PASSWORD}\n", "line 1: expected USER:PASSWORD"),
    (f":{PASSWORD}\n", "line 1: expected USER:PASSWORD"),
    ("fleet:short\n", "line 1: the password must be at least 16"),
])
def test_a_malformed_file_is_refused_without_echoing_it(tmp_path: Path, text: str,
                                                        why: str) -> None:
    with pytest.raises(NdesCredentialsError, match=why) as refused:
        load_credentials(_file(tmp_path, text))
    assert PASSWORD not in str(refused.value) and "short" not in str(refused.value)


def test_a_missing_file_or_a_symlink_is_refused(tmp_path: Path) -> None:
    with pytest.raises(NdesCredentialsError, match="not found"):
        load_credentials(tmp_path / "absent")
    target = _file(tmp_path, f"fleet:{PASSWORD}\n")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(NdesCredentialsError):
        load_credentials(link)


def test_the_page_paths() -> None:
    for path in ("/certsrv/mscep_admin", "/certsrv/mscep_admin/", "/CERTSRV/MSCEP_ADMIN/",
                 "/certsrv/mscep_admin/mscep.dll"):
        assert is_page_path(path)
    for path in ("/certsrv/mscep/", "/certsrv/mscep_admin/x", "/v1/challenges", "/"):
        assert not is_page_path(path)


def test_the_pages_are_utf16_le_with_the_mark_and_ascii_only() -> None:
    page = challenge_page("0123456789ABCDEF0123456789ABCDEF", 1_800_000_000)
    assert page.startswith(codecs.BOM_UTF16_LE)
    text = page.decode("utf-16")
    assert text.isascii()
    assert re.findall(r"<B> (\S+) </B>", text) == ["0123456789ABCDEF0123456789ABCDEF"]
    assert "2027-01-15 08:00:00 UTC" in text
    full = cache_full_page().decode("utf-16")
    assert "The password cache is full." in full and "<B>" not in full


def test_the_section_is_off_by_default_and_its_profile_must_exist(tmp_path: Path) -> None:
    config = parse("", tmp_path)
    assert config.get("ndes", "enabled") is False
    assert config.get("ndes", "challenge_ttl_seconds") == 3600
    with pytest.raises(ConfigError, match=r"ndes.profile: no \[profiles.wifi\] table"):
        parse('[ndes]\nprofile = "wifi"\n', tmp_path)
    with pytest.raises(ConfigError, match="ndes.challenge_ttl_seconds"):
        parse("[ndes]\nchallenge_ttl_seconds = 0\n", tmp_path)
    assert config.get("ndes", "bind") == "admin"
    assert parse('[ndes]\nbind = "scep"\n', tmp_path).get("ndes", "bind") == "scep"
    with pytest.raises(ConfigError, match="ndes.bind"):
        parse('[ndes]\nbind = "metrics"\n', tmp_path)
