"""Throw-away SoftHSM2 tokens for the tests of keys held in a PKCS#11 token.

Each token lives in its own temporary directory: a softhsm2.conf whose
tokendir is beside it, named by SOFTHSM2_CONF in the environment of whatever
loads the module. Tokens are set up with SoftHSM2's and OpenSC's own tools,
never with our code, so a test of our key handling does not lean on itself.
A missing SoftHSM2, libp11 engine or pkcs11-tool goes through
``tests.conftest.missing_peer``: skipped on a developer's machine, a failure
when SCEP_FAST_REQUIRE_PEERS=1.

The benchmarks make their tokens with this module too (``benchmarks/compare.py``,
``benchmarks/padding_timing.py``), so it does not import pytest: they check
``missing()`` first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_MODULES = ("/usr/lib/softhsm/libsofthsm2.so",
            "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")
PIN = "4826-1379"
# The key objects `scep-fast init --generate-in-token` is asked to make.
CA_OBJECT = "scep-ca"
RA_OBJECT = "scep-ra"
SO_PIN = "9911-3377"


def _engines_dir() -> Path | None:
    try:
        out = subprocess.run(["openssl", "version", "-e"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    # ENGINESDIR: "/usr/lib/x86_64-linux-gnu/engines-3"
    _, _, value = out.partition(":")
    return Path(value.strip().strip('"')) if value else None


def softhsm_module() -> str | None:
    return next((m for m in _MODULES if Path(m).exists()), None)


def missing() -> str | None:
    """Why SoftHSM2 tokens cannot be made here, or None."""
    if softhsm_module() is None or shutil.which("softhsm2-util") is None:
        return "SoftHSM2 is not installed (Debian package `softhsm2`)"
    if shutil.which("pkcs11-tool") is None:
        return "pkcs11-tool is not installed (Debian package `opensc`)"
    engines = _engines_dir()
    if engines is None or not (engines / "pkcs11.so").exists():
        return "libp11's OpenSSL engine is not installed (Debian package libengine-pkcs11-openssl)"
    return None


def require() -> None:
    reason = missing()
    if reason is not None:
        from tests.conftest import missing_peer

        missing_peer(reason)


@dataclass(frozen=True)
class Token:
    """One initialised SoftHSM2 token with a user PIN."""

    directory: Path
    label: str
    module: str

    @property
    def conf(self) -> Path:
        return self.directory / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.directory / "tokens"

    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def uri(self, label: str) -> str:
        return f"pkcs11:token={self.label};object={label};type=private"

    def init_options(self, pin_file: Path, ca_object: str = CA_OBJECT,
                     ra_object: str = RA_OBJECT) -> list[str]:
        """The options of `scep-fast init` for a CA and an RA key held in this token."""
        return ["--ca-key-uri", f"pkcs11:token={self.label};object={ca_object}",
                "--ra-key-uri", f"pkcs11:token={self.label};object={ra_object}",
                "--pkcs11-module", self.module, "--pkcs11-pin-file", str(pin_file)]

    def write_pin_file(self, path: Path, mode: int = 0o600) -> Path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(PIN + "\n")
        os.chmod(path, mode)
        return path

    def tool(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """pkcs11-tool on this token, logged in; the PIN travels in the environment."""
        return subprocess.run(
            ["pkcs11-tool", "--module", self.module, "--token-label", self.label, "--login",
             "--pin", "env:SCEP_TEST_PIN", *args],
            env={**self.env(), "SCEP_TEST_PIN": PIN}, capture_output=True, text=True,
            check=check, timeout=60)

    def generate_rsa(self, label: str, key_id: str, bits: int = 2048) -> None:
        self.tool("--keypairgen", "--key-type", f"rsa:{bits}", "--label", label, "--id", key_id,
                  "--sensitive")

    def generate_ec(self, label: str, key_id: str, curve: str = "prime256v1") -> None:
        self.tool("--keypairgen", "--key-type", f"EC:{curve}", "--label", label, "--id", key_id,
                  "--sensitive")

    def import_private_key(self, der: Path, label: str, key_id: str) -> None:
        """A key made outside the token (test vectors): extractable by nature, tests only."""
        self.tool("--write-object", str(der), "--type", "privkey", "--label", label,
                  "--id", key_id)

    def private_key_access(self, label: str) -> str:
        """pkcs11-tool's "Access:" line of the private key ``label``."""
        listing = self.tool("--list-objects", "--type", "privkey").stdout
        # One block per object: "Private Key Object; RSA", then indented fields.
        current = None
        for line in listing.splitlines():
            field, _, value = line.strip().partition(":")
            if line.startswith("Private Key Object"):
                current = None
            elif field == "label":
                current = value.strip()
            elif field == "Access" and current == label:
                return value.strip()
        raise AssertionError(f"no private key {label!r} on the token:\n{listing}")


def make_token(directory: Path, label: str = "scep-test") -> Token:
    """Initialises a fresh token in ``directory`` (created if needed)."""
    require()
    module = softhsm_module()
    assert module is not None
    directory.mkdir(parents=True, exist_ok=True)
    token = Token(directory, label, module)
    token.token_dir.mkdir(mode=0o700, exist_ok=True)
    token.conf.write_text(f"directories.tokendir = {token.token_dir}\n"
                          "objectstore.backend = file\nlog.level = ERROR\n")
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", PIN, "--so-pin", SO_PIN],
                   env=token.env(), check=True, capture_output=True, timeout=60)
    return token
