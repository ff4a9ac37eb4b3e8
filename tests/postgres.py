"""A real PostgreSQL server for tests and benchmarks: initdb in a folder, listening on loopback only,
stopped (immediate) by the returned function; :func:`start_or_skip` skips a test where the Debian package
postgresql is not installed."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path


class NoPostgres(RuntimeError):
    """PostgreSQL is not installed here."""


def start_postgres(tmp: Path) -> tuple[str, Callable[[], None]]:
    """(URL, stop) of a fresh server whose files live under ``tmp`` (a folder the postgres user can enter)."""
    binaries = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not binaries:
        raise NoPostgres("PostgreSQL is not installed (Debian package postgresql)")
    bindir = binaries[-1].parent
    data, sock = tmp / "pgdata", tmp / "pgsock"
    sock.mkdir(parents=True)
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        tmp.chmod(0o755)
        shutil.chown(sock, "postgres")
        data.mkdir()
        shutil.chown(data, "postgres")
    subprocess.run(as_postgres + [str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "hub"], check=True,
                   capture_output=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"), "-o",
                                  f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)

    def stop() -> None:
        subprocess.run(as_postgres + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
    return f"postgresql://hub@127.0.0.1:{port}/postgres", stop


def start_or_skip(tmp: Path) -> tuple[str, Callable[[], None]]:
    import pytest

    try:
        return start_postgres(tmp)
    except NoPostgres as exc:
        pytest.skip(str(exc))
