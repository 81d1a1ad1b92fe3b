"""The configuration is checked strictly: every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from scep_fast.runtime.config import ConfigError, defaults, parse, render, with_overrides

DIR = Path("/nonexistent")


def test_rendered_defaults_parse_back_to_the_same_values() -> None:
    values = defaults()
    values["profiles"]["default"] = {"validity_days": 30, "require_approval": True}
    config = parse(render(values), DIR)
    assert config.get("server", "bind") == "127.0.0.1:8080"
    assert config.values["profiles"]["default"]["validity_days"] == 30
    assert config.values["profiles"]["default"]["require_approval"] is True
    # Keys a profile table leaves out take their defaults.
    assert config.values["profiles"]["default"]["extended_key_usage"] == ["client_auth"]


@pytest.mark.parametrize(("text", "named"), [
    ("[server]\nlisten = 1\n", "server.listen"),
    ("[extra]\nx = 1\n", "extra"),
    ("[server]\nworkers = \"two\"\n", "server.workers"),
    ("[server]\nworkers = true\n", "server.workers"),
    ("[server]\nmax_body_bytes = 10\n", "server.max_body_bytes"),
    ("[server]\nlisten_backlog = 0\n", "server.listen_backlog"),
    ("[pki]\nmode = \"both\"\n", "pki.mode"),
    ("[crl]\npublic_url = \"ftp://x\"\n", "crl.public_url"),
    ("[profiles.vpn]\nkey_types = [\"dsa\"]\n", "profiles.vpn.key_types"),
    ("[profiles.vpn]\nvalidity = 3\n", "profiles.vpn.validity"),
    ("[profiles.vpn]\nsan_pattern = \"(\"\n", "profiles.vpn.san_pattern"),
    ("[profiles.vpn]\nsubject_template = \"no name\"\n", "profiles.vpn"),
    ("[profiles.\"a b\"]\nvalidity_days = 3\n", "profiles.a b"),
    ("[enrollment]\ndefault_profile = \"missing\"\n", "enrollment.default_profile"),
    ("[server\n", "scep-fast.toml"),
    ("[outbox]\nlease_seconds = 15\ntimeout_seconds = 10\n", "outbox.lease_seconds"),
    ("[outbox]\ntimeout_seconds = 40\n", "outbox.lease_seconds"),
])
def test_mistakes_name_their_key(text: str, named: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(text, DIR)
    assert named in str(raised.value)


def test_floats_accept_integers_but_ints_refuse_floats() -> None:
    assert parse("[server]\nread_timeout_seconds = 5\n", DIR).get(
        "server", "read_timeout_seconds") == 5.0
    with pytest.raises(ConfigError, match="server.workers"):
        parse("[server]\nworkers = 2.5\n", DIR)


def test_overrides_are_checked_like_the_file() -> None:
    config = parse("", DIR)
    assert with_overrides(config, {("server", "workers"): 3}).workers == 3
    assert with_overrides(config, {("server", "bind"): None}).get(
        "server", "bind") == "127.0.0.1:8080"
    with pytest.raises(ConfigError, match="server.workers"):
        with_overrides(config, {("server", "workers"): 1000})


@pytest.mark.parametrize("url", [
    "postgresql://scep:hunter2@db.example/scep",
    "postgresql://scep@db.example/scep?password=hunter2",
    "mysql://scep@db.example/scep",
    "host=db.example dbname=scep",
])
def test_a_ledger_url_is_postgresql_without_a_password_and_never_echoed(url: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(f'[ledger]\nurl = "{url}"\n', DIR)
    assert "ledger.url" in str(raised.value)
    assert "hunter2" not in str(raised.value)


def test_a_ledger_url_passes_libpq_parameters_through() -> None:
    url = "postgresql://scep@db.example:5433/scep?sslmode=verify-full&sslrootcert=ca.pem"
    config = parse(f'[ledger]\nurl = "{url}"\npassword_file = "db-password"\n', DIR)
    assert config.get("ledger", "url") == url
    assert parse("", DIR).get("ledger", "url") == ""

