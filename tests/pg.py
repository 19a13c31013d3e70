"""A throwaway PostgreSQL cluster on 127.0.0.1 for tests (Debian's postgresql package).

initdb into a temp folder, pg_ctl start on a free port with a Unix socket in the same folder,
trust auth for the local test user; stopped and deleted afterwards. No skip when the binaries
are missing: the test fails and says which package to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path


def pg_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL binaries not found: apt-get install -y postgresql")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_postgres_user() -> dict[str, object]:
    """initdb refuses to run as root; drop to the `postgres` system user when we are root."""
    if os.geteuid() != 0:
        return {}
    pw = pwd.getpwnam("postgres")
    return {"user": pw.pw_uid, "group": pw.pw_gid}


@contextlib.contextmanager
def postgres_cluster() -> Iterator[str]:
    """Yield a SQLAlchemy URL (postgresql+psycopg://...) to a fresh database.

    The cluster lives in its own folder directly under the temp dir: when we are root it is
    owned by `postgres`, which could not traverse pytest's private (0700) tmp_path tree.
    """
    import tempfile

    bindir = pg_bin()
    workdir = Path(tempfile.mkdtemp(prefix="slmops-pg-"))
    data, sock = workdir / "data", workdir / "sock"
    sock.mkdir(exist_ok=True)
    drop = _as_postgres_user()
    if drop:
        shutil.chown(workdir, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
    run = {"check": True, "capture_output": True, **drop}
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "slmops", "--auth=trust", "-E", "UTF8"],
        **run,
    )  # type: ignore[call-overload]
    port = _free_port()
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock} -c fsync=off"
    subprocess.run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-w",
            "-l",
            str(workdir / "log"),
            "start",
        ],
        **run,
    )  # type: ignore[call-overload]
    try:
        subprocess.run(
            [
                str(bindir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "slmops",
                "slmops",
            ],
            **run,
        )  # type: ignore[call-overload]
        yield f"postgresql+psycopg://slmops@127.0.0.1:{port}/slmops"
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
            **drop,
        )  # type: ignore[call-overload]
        shutil.rmtree(workdir, ignore_errors=True)
