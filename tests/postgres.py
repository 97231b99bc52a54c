"""A real PostgreSQL cluster for tests, on a loopback port, entirely under one temp dir.

    cluster = start_postgres()          # initdb + pg_ctl start
    url = cluster.fresh_database()      # an empty database migrated to head, its own name
    cluster.stop(mode="immediate")      # what a crash looks like to clients
    cluster.start()                     # the same data directory again
    cluster.destroy()

Nothing of the system's PostgreSQL is used but its binaries: the data
directory, the socket and the log live in a temp dir, and the server listens
on 127.0.0.1 on a free port with `trust` authentication (loopback only, a
throwaway cluster). Run as root, the cluster runs as the Debian package's
`postgres` user (initdb refuses root); the temp dir is made its own.

`fsync=off`: the tests stop the server with `-m immediate`, which loses
nothing that reached the kernel; only a power cut would, and none is tested.

`fresh_database()` clones a template that was migrated once per session, so a
test gets a database at the current schema in a few tens of milliseconds
instead of running every migration again.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from mailgate.store.db import make_engine, upgrade

TEMPLATE = "mailgate_template"


def _bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for folder in versions:
        if (folder / name).exists():
            return str(folder / name)
    raise FileNotFoundError(f"{name} not found: install Debian's postgresql (.ci/run does)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    root: Path
    port: int
    user: str | None  # the OS user the server runs as, when we are root
    _names: itertools.count = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(
            _bin("pg_ctl"), "start", "-w", "-t", "60", "-D", str(self.data),
            "-l", str(self.root / "server.log"),
            "-o", f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run(_bin("pg_ctl"), "stop", "-w", "-D", str(self.data), "-m", mode)

    def admin(self, sql: str) -> None:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(sql))
        finally:
            engine.dispose()

    def fresh_database(self) -> str:
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(*, fsync: bool = False) -> Cluster:
    """`fsync=True` for benchmarks: a cluster as durable as a production one."""
    root = Path(tempfile.mkdtemp(prefix="mailgate-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(root, _free_port(), user)
    cluster._run(
        _bin("initdb"), "-D", str(cluster.data), "-U", "postgres", "-A", "trust",
        "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
    )  # fmt: skip
    with open(cluster.data / "postgresql.conf", "a") as conf:
        conf.write("max_connections = 200\nshared_buffers = 64MB\nlog_min_messages = warning\n")
        if not fsync:
            conf.write("fsync = off\nfull_page_writes = off\n")
    cluster.start()
    cluster.admin(f"CREATE DATABASE {TEMPLATE}")
    engine = make_engine(cluster.url(TEMPLATE))
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    return cluster
