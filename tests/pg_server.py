"""A throwaway PostgreSQL cluster for the tests: initdb into a temp folder, a free port on 127.0.0.1.

The machine's own binaries are used (Debian's `postgresql` package; `.ci/run` installs it when absent). initdb
and the server refuse to run as root, so when the tests run as root both run as the `postgres` user (or
`nobody`). Password authentication is on for TCP, so the tests exercise PGPASSWORD the way a partner would.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "su-pw-not-a-secret"
ROLE = "backfill_app"
ROLE_PASSWORD = "app-pw-Kx81-not-logged"


def binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: $BACKFILL_TEST_PG_BIN, PATH, or Debian's newest version."""
    named = os.environ.get("BACKFILL_TEST_PG_BIN")
    if named:
        return Path(named)
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    bin: Path
    data: Path
    port: int
    user: str | None  # the unprivileged account the server runs as, when the tests run as root

    # --- lifecycle ---

    @classmethod
    def create(cls, *, fsync: bool = False) -> PgCluster:
        pg_bin = binaries()
        if pg_bin is None:
            raise FileNotFoundError("no PostgreSQL binaries (install Debian's postgresql package)")
        user = None
        if os.geteuid() == 0:
            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        root = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
        os.chmod(root, 0o755)
        data = root / "data"
        pwfile = root / "pw"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        if user is not None:
            info = pwd.getpwnam(user)
            os.chown(root, info.pw_uid, info.pw_gid)
            os.chown(pwfile, info.pw_uid, info.pw_gid)
        cluster = cls(bin=pg_bin, data=data, port=_free_port(), user=user)
        cluster._as_server(
            [
                str(pg_bin / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--pwfile",
                str(pwfile),
                "-E",
                "UTF8",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-instructions",
                "--no-sync",
            ],
        )
        pwfile.unlink()
        conf = [
            "listen_addresses = '127.0.0.1'",
            f"port = {cluster.port}",
            f"unix_socket_directories = '{root}'",
            "max_connections = 200",
            f"fsync = {'on' if fsync else 'off'}",
            "shared_buffers = 32MB",
            "log_min_messages = warning",
        ]
        with open(data / "postgresql.conf", "a", encoding="utf-8") as out:
            out.write("\n".join(conf) + "\n")
        cluster.start()
        cluster.sql(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'")
        return cluster

    def start(self) -> None:
        self._as_server(
            [
                str(self.bin / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.data.parent / "log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_server(
            [str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"], check=False
        )

    def restart_immediate(self, down_for: float = 0.0) -> None:
        """A crash as far as clients can tell: every connection drops, and no checkpoint is written."""
        self.stop("immediate")
        time.sleep(down_for)
        self.start()

    def destroy(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data.parent, ignore_errors=True)

    # --- use ---

    def url(self, dbname: str, *, user: str = ROLE) -> str:
        """A URL without a password: the password comes from PGPASSWORD, as the tool expects."""
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}" OWNER {ROLE}')
        return self.url(name)

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        done = self._as_server(
            [
                str(self.bin / "psql"),
                "-h",
                str(self.data.parent),
                "-p",
                str(self.port),
                "-U",
                SUPERUSER,
                "-d",
                dbname,
                "-v",
                "ON_ERROR_STOP=1",
                "-At",
                "-c",
                statement,
            ],
        )
        return done.stdout.strip()

    def env(self) -> dict[str, str]:
        """What a client of the tool needs in its environment: the role's password, as libpq reads it."""
        return {"PGPASSWORD": ROLE_PASSWORD}

    def _as_server(self, argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
        psql = Path(argv[0]).name == "psql" and not (self.bin / "psql").exists()
        if psql:
            argv = ["psql", *argv[1:]]
        done = subprocess.run(
            argv,
            user=self.user,
            cwd=self.data.parent if self.data.parent.exists() else "/",
            capture_output=True,
            text=True,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"},
        )
        if check and done.returncode != 0:
            log = self.data.parent / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr}{done.stdout}\n{tail}")
        return done


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


_shared: PgCluster | None = None
_databases = 0


def shared_cluster() -> PgCluster | None:
    """One cluster for the whole test session, started on first use; None (skip) when PostgreSQL is absent.

    Under CI an absent PostgreSQL is an error, not a skip: `.ci/run` installs it, so its absence is a broken CI.
    """
    global _shared
    if _shared is None:
        if binaries() is None:
            if os.environ.get("REQUIRE_PG_TESTS") or os.environ.get("CI"):
                raise RuntimeError("CI: PostgreSQL binaries are missing; .ci/run should have installed them")
            return None
        _shared = PgCluster.create()
        atexit.register(_shared.destroy)
        os.environ["PGPASSWORD"] = ROLE_PASSWORD  # libpq reads it, as a partner's would
    return _shared


def fresh_database() -> str:
    """A new, empty database on the shared cluster, owned by the tool's role: its URL (no password)."""
    global _databases
    cluster = shared_cluster()
    if cluster is None:
        raise RuntimeError("no PostgreSQL")
    _databases += 1
    return cluster.create_database(f"t{os.getpid()}_{_databases}")
