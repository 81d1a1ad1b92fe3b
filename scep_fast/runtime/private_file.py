"""Reading a file that holds a secret: only its owner may read it (mode 0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path


class PrivateFileError(Exception):
    """The file cannot be used; the text says why and names the file, never its content."""


def read_private_file(path: Path, max_bytes: int) -> bytes:
    """The file's bytes, stripped of surrounding white space (perhaps none), refused
    unless it is a regular file of mode 0600 (no group or other bits) holding at
    most ``max_bytes``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise PrivateFileError(f"cannot open {path}: no such file (one of mode 0600 "
                               "is needed)") from None
    except OSError as e:
        raise PrivateFileError(f"cannot open {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        # The mode of what was opened, not of whatever the name points at now.
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise PrivateFileError(f"{path} is not a regular file")
        if mode & 0o077:
            raise PrivateFileError(
                f"{path} has mode {stat.S_IMODE(mode):04o}: group or others may read it; "
                f"it must be 0600 (`chmod 600 {path}`)")
        data = f.read(max_bytes + 1).strip()
    if len(data) > max_bytes:
        raise PrivateFileError(f"{path} holds more than {max_bytes} bytes")
    return data
