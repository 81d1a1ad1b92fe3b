"""Entry point of one worker process, started by the supervisor.

    python -m scep_fast.runtime.worker --dir DIR --fd N [--supervisor-fd M] [--log-level L]

The listening socket arrives as file descriptor N and, as M, the read end of
a pipe that reaches end of file once the supervisor is gone;
PROMETHEUS_MULTIPROC_DIR arrives in the environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scep-fast-worker")
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--supervisor-fd", type=int, default=None)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)

    from scep_fast.runtime import config, logs, server

    logs.configure(args.log_level.upper())
    server.run_worker(config.load(args.dir), f"fd://{args.fd}", supervisor_fd=args.supervisor_fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
