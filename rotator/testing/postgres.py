"""A real PostgreSQL cluster on a free loopback port, for tests and benchmarks.

The ``postgres`` provider is tested against the real server rather than a fake, because what
matters is exactly what a fake would get wrong: SCRAM verifiers, ``COMMENT ON ROLE``, what the
server logs and who may alter whom. The cluster lives in a private temporary directory (data,
unix socket, log), uses SCRAM-SHA-256 for every connection, and is stopped by pid, never by
name (see :mod:`rotator.testing.server_process`). Run as root, ``initdb`` and ``postgres`` run
as the ``postgres`` OS user (PostgreSQL refuses to run as root); otherwise they run as the
current user.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rotator.errors import PermanentError
from rotator.interfaces import Secret
from rotator.testing.server_process import HOST, ServerProcess, clean_env

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresCluster", "PostgresError", "find_pg_bindir"]

START_TIMEOUT = 60.0
STOP_GRACE = 10.0
_RUN_AS = "postgres"
"""The OS user that owns the cluster when this process is root."""


class PostgresError(PermanentError):
    """The cluster could not be found, initialised or started; the message says why."""


def find_pg_bindir() -> str:
    """Directory of ``initdb`` and ``postgres``: ``$ROTATOR_PG_BINDIR``, else the newest
    Debian/Ubuntu ``/usr/lib/postgresql/<version>/bin``, else wherever ``initdb`` is on PATH."""
    wanted = os.environ.get("ROTATOR_PG_BINDIR")
    candidates = [wanted] if wanted else []
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                reverse=True)
    candidates += debian
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for bindir in candidates:
        if all(os.access(os.path.join(bindir, tool), os.X_OK) for tool in ("initdb", "postgres")):
            return bindir
    raise PostgresError(
        "PostgreSQL server binaries (initdb, postgres) were not found in "
        "/usr/lib/postgresql/*/bin nor on PATH: apt-get install postgresql, or set "
        "ROTATOR_PG_BINDIR to the directory holding them"
    )


class PostgresCluster(ServerProcess):
    """A throw-away cluster: ``initdb --auth=scram-sha-256`` and ``postgres`` on 127.0.0.1.

    The superuser's password is random, handed to ``initdb`` in a file that is deleted right
    after, and exposed only as a :class:`Secret`. ``settings`` adds ``-c name=value`` server
    settings (``log_statement="all"`` for the tests that search the log for passwords).
    ``preload_pg_stat_statements`` loads that extension when the installation has it.
    ``start()`` returns once the superuser can log in; ``stop()`` (a fast shutdown: SIGINT,
    then SIGQUIT, then SIGKILL) is idempotent and also runs at interpreter exit.
    """

    label = "PostgreSQL"
    slug = "postgres"
    error = PostgresError
    port_taken = "could not bind"
    start_timeout = START_TIMEOUT
    stop_grace = STOP_GRACE
    # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
    stop_signals = (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL)

    def __init__(self, *, superuser: str = "postgres", port: int | None = None,
                 settings: Mapping[str, str] | None = None,
                 preload_pg_stat_statements: bool = False) -> None:
        super().__init__(port)
        self.host = HOST
        self.superuser = superuser
        self.password = Secret(secrets.token_urlsafe(24))
        self.pg_stat_statements = False
        """True once started with pg_stat_statements preloaded (the extension still has to be
        created in a database with CREATE EXTENSION)."""
        self._settings = dict(settings or {})
        self._want_pgss = preload_pg_stat_statements
        self._bindir = ""

    @property
    def datadir(self) -> str:
        assert self._tmpdir is not None, "the cluster is not started"
        return os.path.join(self._tmpdir, "data")

    def _prepare(self) -> None:
        """Find the binaries, give the private directory to the owner, initdb."""
        assert self._tmpdir is not None
        self._bindir = find_pg_bindir()
        owner = self._popen_extra()
        if owner:
            os.chown(self._tmpdir, owner["user"], owner["group"])
        self._initdb()

    def _popen_extra(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a child as the cluster's owner (postgres if root).

        Popen(user=...) rather than runuser: the pid we hold is the postmaster itself, so
        stopping by pid signals the server and nothing else."""
        if os.geteuid() != 0:
            return {}
        try:
            pw = pwd.getpwnam(_RUN_AS)
        except KeyError:
            raise PostgresError(
                f"running as root, but there is no {_RUN_AS!r} OS user to own the cluster "
                "(PostgreSQL refuses to run as root): install Debian's postgresql package or "
                "run the tests as an ordinary user"
            ) from None
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _env(self) -> dict[str, str]:
        """A clean environment: no PG* variables from the parent, HOME in the private dir."""
        assert self._tmpdir is not None
        return clean_env(("PG",), HOME=self._tmpdir, LC_ALL="C", LANG="C")

    def _initdb(self) -> None:
        assert self._tmpdir is not None
        owner = self._popen_extra()
        pwfile = os.path.join(self._tmpdir, "pwfile")
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(self.password.reveal() + "\n")
            if owner:
                os.chown(pwfile, owner["user"], owner["group"])
            proc = subprocess.run(
                [os.path.join(self._bindir, "initdb"), "-D", self.datadir, "-U", self.superuser,
                 "--auth=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8",
                 "--locale=C", "--no-sync", "--no-instructions"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=self._env(), cwd=self._tmpdir, timeout=120, check=False, **owner,
            )
        finally:
            Path(pwfile).unlink(missing_ok=True)
        if proc.returncode != 0:
            out = proc.stdout.decode(errors="replace").replace(self.password.reveal(), "[REDACTED]")
            raise PostgresError(f"initdb failed with status {proc.returncode}:\n{out[-2000:]}")

    def _server_settings(self) -> dict[str, str]:
        assert self._tmpdir is not None
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": self._tmpdir,
            "password_encryption": "scram-sha-256",
            # A throw-away cluster: durability costs time and buys nothing.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "logging_collector": "off",
            "log_line_prefix": "%m [%p] %q%u@%d ",
        }
        self.pg_stat_statements = False
        if self._want_pgss and self._has_extension("pg_stat_statements"):
            settings["shared_preload_libraries"] = "pg_stat_statements"
            settings["pg_stat_statements.track_utility"] = "on"
            self.pg_stat_statements = True
        settings.update(self._settings)
        return settings

    def _has_extension(self, name: str) -> bool:
        sharedir = subprocess.run([os.path.join(self._bindir, "pg_config"), "--sharedir"],
                                  capture_output=True, text=True, check=False).stdout.strip()
        return bool(sharedir) and Path(sharedir, "extension", f"{name}.control").is_file()

    def _command(self) -> list[str]:
        args = [os.path.join(self._bindir, "postgres"), "-D", self.datadir]
        for name, value in self._server_settings().items():
            args += ["-c", f"{name}={value}"]
        return args

    def _probe(self) -> bool:
        """Can the superuser log in? With our random password, so the answer comes from this
        cluster and not from another server that already held the port."""
        import psycopg

        try:
            with self.connect_admin(connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def _secret_values(self) -> list[str]:
        return [self.password.reveal()]

    def __repr__(self) -> str:
        return f"PostgresCluster(host={self.host!r}, port={self.port}, pid={self.pid})"

    # -- helpers for tests and benchmarks -------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server logged so far (with ``log_statement=all``, every statement)."""
        return self.log_path.read_text(errors="replace")

    def dsn_for(self, user: str, password: Secret | str | None = None,
                dbname: str = "postgres") -> str:
        """A libpq conninfo string for ``user`` on this cluster. It holds the password when one
        is given: pass it straight to a client, never to a log or a message."""
        from psycopg.conninfo import make_conninfo

        params: dict[str, Any] = {"host": self.host, "port": self.port, "user": user,
                                  "dbname": dbname, "sslmode": "disable"}
        if password is not None:
            params["password"] = password.reveal() if isinstance(password, Secret) else password
        return make_conninfo(**params)

    def connect_admin(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection[Any]:
        """An autocommit connection as the superuser."""
        import psycopg

        kwargs.setdefault("connect_timeout", 10)
        return psycopg.connect(host=self.host, port=self.port, user=self.superuser,
                               password=self.password.reveal(), dbname=dbname, autocommit=True,
                               sslmode="disable", **kwargs)
