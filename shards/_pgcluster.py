"""A throw-away PostgreSQL 15 cluster (initdb, pg_ctl, psql, pgbench) for the demo and tests.

Theory of operation
-------------------
initdb refuses to run as root, so when the tests run as root every PostgreSQL
command runs as the unprivileged ``postgres`` user (``runuser -u postgres --``) in
a temporary directory chown'ed to it. The server listens only on a unix socket in
that directory (``listen_addresses = ''``), so nothing touches the network and two
clusters never collide. Every command has a timeout; ``stop()`` is idempotent and
``cleanup()`` stops the server before deleting the directory, so a fixture
finaliser can always call it.

``find_pg_bin()`` locates the binaries. Used by ``python -m comm demo`` and by the
tests (tests/pgcluster.py adds the pytest policy for missing binaries).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

DEFAULT_PG_BIN = "/usr/lib/postgresql/15/bin"
PG_USER = "postgres"
CMD_TIMEOUT = 120.0
NEEDED = ("initdb", "pg_ctl", "psql", "pgbench", "pg_controldata")


class PgUnavailable(RuntimeError):
    """PostgreSQL binaries (or a user to run them as) are missing."""


def find_pg_bin() -> Path | None:
    """Directory holding initdb & co: $PG_BIN, /usr/lib/postgresql/15/bin, or PATH."""
    for cand in (os.environ.get("PG_BIN"), DEFAULT_PG_BIN):
        if cand and all((Path(cand) / n).is_file() for n in NEEDED):
            return Path(cand)
    found = shutil.which("initdb")
    if found and all(shutil.which(n) for n in NEEDED):
        return Path(found).parent
    return None


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
                       check=True, capture_output=True, timeout=30)
        return pwd.getpwnam(name)
    except (OSError, subprocess.SubprocessError, KeyError) as e:
        raise PgUnavailable(f"no user {name!r} to run PostgreSQL as; useradd: {e}") from e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgCluster:
    """One PostgreSQL cluster in its own temporary directory (see module docstring)."""

    def __init__(self, pg_bin: Path | str | None = None, base_dir: Path | str | None = None,
                 port: int | None = None) -> None:
        found = Path(pg_bin) if pg_bin is not None else find_pg_bin()
        if found is None:
            raise PgUnavailable("PostgreSQL binaries not found")
        self.pg_bin = found
        self._as_root = os.geteuid() == 0
        self._user = _ensure_user(PG_USER) if self._as_root else None
        self.base = Path(tempfile.mkdtemp(prefix="pgcluster-", dir=base_dir))
        self._chown(self.base)
        self.pgdata = self.base / "data"
        self.sockdir = self.base  # short path: unix socket paths are limited to ~100 bytes
        self.logfile = self.base / "server.log"
        self.port = port or _free_port()
        self.running = False

    # ------------------------------------------------------------ plumbing

    def _chown(self, path: Path) -> None:
        if self._user is not None:
            os.chown(path, self._user.pw_uid, self._user.pw_gid)

    def run(self, tool: str, *args: str, input: str | None = None,
            timeout: float = CMD_TIMEOUT, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL binary (as the postgres user when we are root)."""
        cmd = [str(self.pg_bin / tool), *args]
        if self._as_root:
            cmd = ["runuser", "-u", PG_USER, "--", *cmd]
        env = {**os.environ, "PGHOST": str(self.sockdir), "PGPORT": str(self.port),
               "LC_ALL": "C", "PGTZ": "UTC"}
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env,
                              cwd=self.base, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} exited {proc.returncode}:\n"
                               f"{proc.stdout}\n{proc.stderr}\n{self._log_tail()}")
        return proc

    def _log_tail(self, n: int = 30) -> str:
        try:
            return "server log tail:\n" + "\n".join(self.logfile.read_text().splitlines()[-n:])
        except OSError:
            return ""

    # ------------------------------------------------------------ lifecycle

    def init(self, *, data_checksums: bool = True) -> PgCluster:
        """initdb (with --data-checksums by default) and a test-friendly config."""
        args = ["-D", str(self.pgdata), "-A", "trust", "-U", PG_USER, "--no-sync",
                "-E", "UTF8", "--locale=C"]
        if data_checksums:
            args.append("--data-checksums")
        self.run("initdb", *args)
        with open(self.pgdata / "postgresql.conf", "a") as f:
            f.write(f"\nlisten_addresses = ''\nunix_socket_directories = '{self.sockdir}'\n"
                    f"port = {self.port}\nfsync = off\nautovacuum = off\n"
                    "shared_buffers = 16MB\nmax_connections = 20\n")
        return self

    def start(self) -> None:
        if self.running:
            return
        self.run("pg_ctl", "-D", str(self.pgdata), "-l", str(self.logfile), "-w",
                 "-t", "60", "start")
        self.running = True

    def stop(self) -> None:
        """Fast shutdown (a clean checkpoint); idempotent."""
        if not (self.pgdata / "postmaster.pid").exists():
            self.running = False
            return
        self.run("pg_ctl", "-D", str(self.pgdata), "-m", "fast", "-w", "-t", "60", "stop",
                 check=False)
        if (self.pgdata / "postmaster.pid").exists():  # fast failed: do not leak a server
            self.run("pg_ctl", "-D", str(self.pgdata), "-m", "immediate", "-w", "stop",
                     check=False)
        self.running = False

    def cleanup(self) -> None:
        """Stop the server and delete the directory (idempotent)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def clone(self, base_dir: Path | str | None = None) -> PgCluster:
        """A stopped copy of this (stopped) cluster in a new directory, on a new port."""
        if self.running:
            raise RuntimeError("stop the cluster before cloning it")
        other = PgCluster(self.pg_bin, base_dir=base_dir)
        shutil.copytree(self.pgdata, other.pgdata, symlinks=True)
        if other._user is not None:
            for root, dirs, files in os.walk(other.pgdata):
                for name in (*dirs, *files):
                    os.lchown(os.path.join(root, name), other._user.pw_uid,
                              other._user.pw_gid)
            other._chown(other.pgdata)
        conf = other.pgdata / "postgresql.conf"
        conf.write_text(conf.read_text().replace(str(self.sockdir), str(other.sockdir))
                        + f"\nport = {other.port}\n")
        return other

    # ------------------------------------------------------------ SQL and tools

    def psql(self, sql: str, db: str = "postgres") -> str:
        """Run SQL (ON_ERROR_STOP); returns unaligned, tuples-only output."""
        return self.run("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", db,
                        "-f", "-", input=sql).stdout.strip()

    def pgbench(self, *args: str, db: str = "postgres") -> str:
        return self.run("pgbench", *args, db).stdout

    def checkpoint(self) -> None:
        self.psql("CHECKPOINT;")

    def controldata(self) -> dict[str, str]:
        out = self.run("pg_controldata", "-D", str(self.pgdata)).stdout
        return {k.strip(): v.strip() for k, _, v in
                (line.partition(":") for line in out.splitlines()) if v}

    def checkpoint_lsn(self) -> int:
        hi, _, lo = self.controldata()["Latest checkpoint location"].partition("/")
        return (int(hi, 16) << 32) | int(lo, 16)


def make_pgbench_cluster(scale: int = 2, base_dir: Path | str | None = None) -> PgCluster:
    """A checksummed cluster with ``pgbench -i -s scale`` loaded, checkpointed and stopped."""
    pg = PgCluster(base_dir=base_dir)
    try:
        pg.init()
        pg.start()
        pg.pgbench("-i", "-s", str(scale), "-q")
        pg.checkpoint()
        pg.stop()
    except BaseException:
        pg.cleanup()
        raise
    return pg


def relation_pages(pgdata: Path | str) -> dict[tuple[tuple[int, int, int, int], int], bytes]:
    """Every page of every relation file, keyed by ((spc, db, relfilenode, fork), blkno).

    Written independently of shards._pgimport so that tests of the importer do not
    trust its own directory walk.
    """
    forks = {"": 0, "fsm": 1, "vm": 2, "init": 3}
    pgdata = Path(pgdata)
    dirs: list[tuple[int, int, Path]] = [(1664, 0, pgdata / "global")]
    dirs += [(1663, int(d.name), d) for d in (pgdata / "base").iterdir() if d.name.isdigit()]
    for t in (pgdata / "pg_tblspc").glob("*"):
        for d in t.glob("PG_15_*/*"):
            if d.name.isdigit():
                dirs.append((int(t.name), int(d.name), d))
    out: dict[tuple[tuple[int, int, int, int], int], bytes] = {}
    for spc, db, d in dirs:
        for f in d.iterdir():
            name, _, seg = f.name.partition(".")
            node, _, fork = name.partition("_")
            if not node.isdigit() or fork not in forks or (seg and not seg.isdigit()):
                continue
            data = f.read_bytes()
            base = int(seg or 0) * 131072
            for i in range(len(data) // 8192):
                out[((spc, db, int(node), forks[fork]), base + i)] = data[i * 8192:(i + 1) * 8192]
    return out
