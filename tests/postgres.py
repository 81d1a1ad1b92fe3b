"""A real PostgreSQL server for the tests, started in a temporary directory.

``initdb`` makes a cluster in a fresh directory and ``postgres`` serves it on
127.0.0.1 on a free port (and on a Unix socket in that directory), with a
password (SCRAM) for TCP connections. As root, both run as an unprivileged
user (``postgres`` if it exists, else ``nobody``), which owns the directory:
PostgreSQL refuses to run as root. A missing PostgreSQL goes through
``missing_peer``: skipped on a developer's machine, a failure in CI.

The benchmarks start their database with this module too (``benchmarks/compare.py``),
so it does not import pytest: they check ``server_binaries()`` first.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Where Debian's `postgresql` package puts the server binaries, newest first.
_DEBIAN_ROOT = Path("/usr/lib/postgresql")
SUPERUSER = "scep_test"
START_TIMEOUT_SECONDS = 60
# What the tests run with; postgres_server(settings=...) overrides or adds to it.
DEFAULT_SETTINGS = {"max_connections": "200", "shared_buffers": "32MB"}


def server_binaries() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None."""
    configured = os.environ.get("SCEP_FAST_PG_BIN")
    if configured:
        return Path(configured) if (Path(configured) / "initdb").exists() else None
    if _DEBIAN_ROOT.is_dir():
        versions = sorted((p for p in _DEBIAN_ROOT.iterdir() if (p / "bin" / "initdb").exists()),
                          key=lambda p: int(p.name) if p.name.isdigit() else 0, reverse=True)
        if versions:
            return versions[0] / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    directory: Path
    port: int
    password: str
    process: subprocess.Popen[bytes]
    # Server settings (-c NAME=VALUE) beside the address, kept for a restart.
    settings: Mapping[str, str]

    def url(self, database: str = "postgres", *, with_password: bool = True) -> str:
        secret = f":{self.password}" if with_password else ""
        return f"postgresql://{SUPERUSER}{secret}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, *params: Any, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Runs one statement outside a transaction (CREATE DATABASE needs that)."""
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True) as conn:
            cursor = conn.execute(sql.encode(), params or None)
            return cursor.fetchall() if cursor.description else []

    def new_database(self) -> str:
        name = f"t_{secrets.token_hex(6)}"
        self.admin(f"CREATE DATABASE {name}")
        return name

    def stop(self, sig: int = signal.SIGINT) -> None:
        """SIGINT is PostgreSQL's fast shutdown; SIGKILL leaves crash recovery to the next start."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def start(self) -> None:
        """Starts the server again on the same directory and port."""
        self.process = _launch(self.directory, self.port, self.settings)
        _wait_ready(self)


def _unprivileged() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as when we are root; None when we are not."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("no unprivileged user (postgres or nobody) to run PostgreSQL as")


def _run_as() -> dict[str, Any]:
    user = _unprivileged()
    return {} if user is None else {"user": user.pw_uid, "group": user.pw_gid,
                                    "extra_groups": []}


def _launch(directory: Path, port: int, settings: Mapping[str, str]) -> subprocess.Popen[bytes]:
    binaries = server_binaries()
    assert binaries is not None
    log = (directory / "server.log").open("ab")
    options = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    return subprocess.Popen(
        [str(binaries / "postgres"), "-D", str(directory / "data"), "-p", str(port),
         "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={directory}",
         *options],
        stdout=log, stderr=subprocess.STDOUT, cwd=directory, **_run_as())


def _wait_ready(server: PostgresServer) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while True:
        if server.process.poll() is not None:
            log = (server.directory / "server.log").read_text(errors="replace")
            raise RuntimeError(f"postgres exited: {log[-2000:]}")
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def postgres_server(settings: Mapping[str, str] | None = None) -> Iterator[PostgresServer]:
    """A fresh cluster for the duration of the block, then stopped and removed.

    ``settings`` override or add to DEFAULT_SETTINGS.
    """
    binaries = server_binaries()
    if binaries is None:
        from tests.conftest import missing_peer  # the tests' only: it needs pytest

        missing_peer("PostgreSQL is not installed (Debian package `postgresql`)")
    directory = Path(tempfile.mkdtemp(prefix="scep-fast-pg-"))
    try:
        user = _unprivileged()
        if user is not None:
            os.chown(directory, user.pw_uid, user.pw_gid)
        password = secrets.token_urlsafe(18)
        password_file = directory / "initdb-password"
        password_file.write_text(password + "\n")
        if user is not None:
            os.chown(password_file, user.pw_uid, user.pw_gid)
        done = subprocess.run(
            [str(binaries / "initdb"), "-D", str(directory / "data"), "-U", SUPERUSER,
             f"--pwfile={password_file}", "--auth-host=scram-sha-256", "--auth-local=trust",
             "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            capture_output=True, text=True, timeout=120, cwd=directory, **_run_as())
        password_file.unlink()
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout}{done.stderr}")
        port = _free_port()
        chosen = {**DEFAULT_SETTINGS, **(settings or {})}
        server = PostgresServer(directory, port, password, _launch(directory, port, chosen),
                                chosen)
        try:
            _wait_ready(server)
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
