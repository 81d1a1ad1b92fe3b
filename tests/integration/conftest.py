"""A real `scep-fast serve` process on 127.0.0.1, on a free port, per test module or test."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CHALLENGE = "integration-secret-Zq8"
START_TIMEOUT_SECONDS = 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scep_fast(*args: str, env: dict[str, str] | None = None,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scep_fast.runtime.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def init_dir(directory: Path, *extra: str) -> Path:
    done = scep_fast("init", "--dir", str(directory), "--challenge", CHALLENGE, *extra)
    assert done.returncode == 0, done.stderr
    return directory


def set_config(directory: Path, section: str, key: str, value: str) -> None:
    path = directory / "scep-fast.toml"
    lines = path.read_text().splitlines()
    current = ""
    for i, line in enumerate(lines):
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.split(" = ")[0] == key:
            lines[i] = f"{key} = {value}"
            break
    else:
        raise KeyError(f"{section}.{key}")
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Server:
    directory: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    metrics_port: int
    admin_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/scep"

    def log(self) -> str:
        """The server's output so far, up to its last complete line."""
        text = self.log_path.read_text(errors="replace")
        return text[:text.rfind("\n") + 1]

    def request(self, method: str, target: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read_body = response.read()  # type: ignore[attr-defined]
        conn.close()
        return response

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


def start_server(directory: Path, *extra: str, cwd: Path | None = None,
                 port: int | None = None, env: dict[str, str] | None = None) -> Server:
    """``scep-fast serve`` on loopback; with ``cwd``, the installed console script run there.

    ``env`` is laid over this process's environment (SOFTHSM2_CONF, say).
    """
    port = port or free_port()
    metrics_port = free_port()
    admin_port = free_port()
    log_path = directory.parent / f"{directory.name}-server.log"
    log = log_path.open("wb")
    command = ([str(Path(sys.executable).parent / "scep-fast")] if cwd is not None
               else [sys.executable, "-m", "scep_fast.runtime.cli"])
    process = subprocess.Popen(
        [*command, "serve", "--dir", str(directory),
         "--bind", f"127.0.0.1:{port}", "--metrics-bind", f"127.0.0.1:{metrics_port}",
         "--admin-bind", f"127.0.0.1:{admin_port}", *extra],
        stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
        env={**os.environ, **env} if env is not None else None)
    server = Server(directory, port, process, log_path, metrics_port, admin_port)
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {server.log()}")
        try:
            # Every listener: SCEP, metrics and the admin API.
            for listening in (port, metrics_port, admin_port):
                with socket.create_connection(("127.0.0.1", listening), timeout=0.5):
                    pass
            return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"server did not start: {server.log()}")


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Starts servers on fresh directories; ``configure`` edits the config first."""
    started: list[Server] = []

    def make(*init_args: str, name: str = "scep",
             configure: Callable[[Path], None] | None = None) -> Server:
        directory = init_dir(tmp_path / name, *init_args)
        if configure is not None:
            configure(directory)
        server = start_server(directory)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for a whole module (RA mode, RSA-2048 CA, default policy)."""
    directory = init_dir(tmp_path_factory.mktemp("shared") / "scep")
    running = start_server(directory)
    yield running
    running.stop()
