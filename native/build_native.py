"""cffi builder for scep_fast._native.

The cdef is read from the real header and the sources are the real .c files
under native/src, so the C core is also plain C that any compiler or analyser
can read. Set SCEP_FAST_SANITIZE=1 to build with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "include" / "scep_native.h"
SOURCES = sorted((HERE / "src").glob("*.c"))

_INT_DEFINE = re.compile(r"^#define\s+\w+\s+-?\d+\s*(/\*.*\*/)?\s*$")


def _version() -> str:
    text = (HERE.parent / "scep_fast" / "__init__.py").read_text()
    match = re.search(r'^__version__ = "([^"]+)"', text, re.M)
    if match is None:
        raise RuntimeError("scep_fast/__init__.py has no __version__")
    return match.group(1)


def _cdef() -> str:
    """The header without preprocessor lines that cffi cannot read."""
    lines = []
    for line in HEADER.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not _INT_DEFINE.match(stripped):
            continue
        lines.append(line)
    return "\n".join(lines)


def _flags() -> tuple[list[str], list[str]]:
    compile_args = [
        "-std=c11",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-O2",
        # Only OpenSSL 3 APIs: a deprecated call is a compile error.
        "-DOPENSSL_API_COMPAT=30000",
        "-DOPENSSL_NO_DEPRECATED",
        f'-DSCEP_FAST_VERSION="{_version()}"',
    ]
    link_args: list[str] = []
    if os.environ.get("SCEP_FAST_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
        compile_args += sanitize + ["-fno-omit-frame-pointer", "-g", "-O1"]
        link_args += sanitize
    return compile_args, link_args


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
_compile_args, _link_args = _flags()
ffibuilder.set_source(
    "scep_fast._native",
    '#include "scep_native.h"\n',
    sources=[str(p.relative_to(HERE.parent)) for p in SOURCES],
    include_dirs=[str(HERE / "include"), str(HERE / "src")],
    libraries=["crypto"],
    extra_compile_args=_compile_args,
    extra_link_args=_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
