"""The layers of DESIGN.md: protocol/ and service/ import no I/O machinery."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTOCOL_DIR = ROOT / "scep_fast" / "protocol"

# Only runtime/ may import these.
IO_MODULES = ("trio", "hypercorn", "lmdb", "prometheus_client", "psycopg", "psycopg_pool")

_PROBE = """
import importlib, json, pkgutil, sys
import scep_fast.protocol
protocol_modules = []
imported = []
# Every module of protocol/ first (what they pull in is recorded on its own),
# then every module of service/: a module nobody imports is checked all the same.
for package in ("scep_fast.protocol", "scep_fast.service"):
    base = importlib.import_module(package)
    for info in pkgutil.iter_modules(base.__path__, package + "."):
        importlib.import_module(info.name)
        imported.append(info.name)
    if package == "scep_fast.protocol":
        protocol_modules = sorted(sys.modules)
print(json.dumps({"imported": imported, "protocol": protocol_modules,
                  "all": sorted(sys.modules)}))
"""


def _probe() -> dict[str, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # A fresh interpreter: pytest's own imports must not hide or fake anything.
    completed = subprocess.run(
        [sys.executable, "-c", _PROBE],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, list[str]] = json.loads(completed.stdout)
    return result


def _top_level(modules: list[str]) -> set[str]:
    return {name.partition(".")[0] for name in modules}


def test_protocol_and_service_import_no_io_libraries() -> None:
    result = _probe()
    # Every source file of both packages was imported, not the packages alone.
    for package in ("protocol", "service"):
        sources = {p.stem for p in (ROOT / "scep_fast" / package).glob("*.py")} - {"__init__"}
        assert len(sources) >= 5
        for stem in sources:
            assert f"scep_fast.{package}.{stem}" in result["imported"]
    loaded = _top_level(result["all"])
    for name in IO_MODULES:
        assert name not in loaded, f"{name} imported by {result['imported']}"


def test_protocol_imports_neither_crypto_nor_runtime_nor_logging() -> None:
    loaded = set(_probe()["protocol"])
    for name in ("scep_fast.crypto", "scep_fast.runtime", "scep_fast.service", "logging", "socket"):
        assert name not in loaded


# Everything protocol/ may import, checked statically so that a lazy import
# inside a function cannot slip past the sys.modules check above.
_ALLOWED_IMPORTS = {
    "__future__",
    "binascii",
    "dataclasses",
    "enum",
    "re",
    "typing",
    "urllib.parse",
}


def test_protocol_sources_import_only_the_allowed_modules() -> None:
    sources = sorted(PROTOCOL_DIR.glob("*.py"))
    assert len(sources) >= 6
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level > 0:
                    # Relative imports must stay inside protocol/.
                    assert node.level == 1, f"{path.name} reaches outside protocol/"
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name in _ALLOWED_IMPORTS, f"{path.name} imports {name}"


def test_probe_really_loaded_the_protocol_package() -> None:
    # Guards the checks above against passing because nothing was imported.
    loaded = set(_probe()["protocol"])
    for name in ("request", "messages", "caps", "errors", "enums"):
        assert f"scep_fast.protocol.{name}" in loaded
