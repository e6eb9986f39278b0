"""A real PostgreSQL cluster on a free loopback port, for tests and benchmarks.

The ``postgres`` provider is tested against the real server rather than a fake, because what
matters is exactly what a fake would get wrong: SCRAM verifiers, ``COMMENT ON ROLE``, what the
server logs and who may alter whom. The cluster lives in a private temporary directory (data,
unix socket, log), uses SCRAM-SHA-256 for every connection, and is stopped by pid, never by
name. Run as root, ``initdb`` and ``postgres`` run as the ``postgres`` OS user (PostgreSQL
refuses to run as root); otherwise they run as the current user.
"""

from __future__ import annotations

import atexit
import glob
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from rotator.errors import PermanentError
from rotator.interfaces import Secret

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresCluster", "PostgresError", "find_pg_bindir"]

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0
STOP_GRACE = 10.0
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 20
_RUN_AS = "postgres"
"""The OS user that owns the cluster when this process is root."""

_running: set[PostgresCluster] = set()
_running_lock = threading.Lock()


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@atexit.register
def _stop_all() -> None:
    """Stop clusters a crashed test run forgot, so none outlives the interpreter."""
    with _running_lock:
        clusters = list(_running)
    for cluster in clusters:
        cluster.stop()


class PostgresCluster:
    """A throw-away cluster: ``initdb --auth=scram-sha-256`` and ``postgres`` on 127.0.0.1.

    The superuser's password is random, handed to ``initdb`` in a file that is deleted right
    after, and exposed only as a :class:`Secret`. ``settings`` adds ``-c name=value`` server
    settings (``log_statement="all"`` for the tests that search the log for passwords).
    ``preload_pg_stat_statements`` loads that extension when the installation has it.
    ``start()`` returns once the superuser can log in; ``stop()`` is idempotent and also runs
    at interpreter exit.
    """

    def __init__(self, *, superuser: str = "postgres", port: int | None = None,
                 settings: Mapping[str, str] | None = None,
                 preload_pg_stat_statements: bool = False) -> None:
        self.host = "127.0.0.1"
        self.superuser = superuser
        self.password = Secret(secrets.token_urlsafe(24))
        self.port: int = port or 0
        self.pid: int | None = None
        self.pg_stat_statements = False
        """True once started with pg_stat_statements preloaded (the extension still has to be
        created in a database with CREATE EXTENSION)."""
        self._requested_port = port
        self._settings = dict(settings or {})
        self._want_pgss = preload_pg_stat_statements
        self._bindir = ""
        self._tmpdir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def datadir(self) -> str:
        assert self._tmpdir is not None, "the cluster is not started"
        return os.path.join(self._tmpdir, "data")

    @property
    def log_path(self) -> Path:
        assert self._tmpdir is not None, "the cluster is not started"
        return Path(self._tmpdir, "postgres.log")

    def start(self) -> PostgresCluster:
        """initdb, start the server and wait until the superuser can log in."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return self
            self._bindir = find_pg_bindir()
            try:
                self._make_dir()
                self._initdb()
                attempts = 1 if self._requested_port else _PORT_ATTEMPTS
                for attempt in range(1, attempts + 1):
                    self.port = self._requested_port or _free_port()
                    try:
                        self._spawn()
                        self._wait_ready()
                    except PostgresError as exc:
                        tail = self._log_tail()
                        self._kill_server()
                        if attempt < attempts and "could not bind" in tail:
                            log.debug("port %d was taken, retrying on another", self.port)
                            continue
                        raise PostgresError(
                            f"{exc}\n--- last lines of the PostgreSQL log ---\n{tail}") from None
                    break
            except BaseException:
                self._terminate()  # e.g. Ctrl-C while waiting: leave nothing behind
                raise
            with _running_lock:
                _running.add(self)
            log.debug("PostgreSQL pid %s listening on %s:%s", self.pid, self.host, self.port)
            return self

    def _as_owner(self) -> dict[str, Any]:
        """``subprocess`` arguments that run a child as the cluster's owner (postgres if root)."""
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

    def _make_dir(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="rotator-postgres-")
        owner = self._as_owner()
        if owner:
            os.chown(self._tmpdir, owner["user"], owner["group"])

    def _child_env(self) -> dict[str, str]:
        """A clean environment: no PG* variables from the parent, HOME in the private dir."""
        assert self._tmpdir is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(HOME=self._tmpdir, LC_ALL="C", LANG="C")
        return env

    def _initdb(self) -> None:
        assert self._tmpdir is not None
        owner = self._as_owner()
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
                env=self._child_env(), cwd=self._tmpdir, timeout=120, check=False, **owner,
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

    def _spawn(self) -> None:
        assert self._tmpdir is not None
        args = [os.path.join(self._bindir, "postgres"), "-D", self.datadir]
        for name, value in self._server_settings().items():
            args += ["-c", f"{name}={value}"]
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        # Popen(user=...) rather than runuser: the pid we hold is the postmaster itself, so
        # stopping by pid signals the server and nothing else.
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=self._child_env(), cwd=self._tmpdir, start_new_session=True, **self._as_owner(),
        )
        self.pid = self._proc.pid

    def _wait_ready(self) -> None:
        """Poll until the superuser logs in: with our random password, so the answer comes
        from this cluster and not from another server that already held the port."""
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            code = self._proc.poll()
            if code is not None:
                raise PostgresError(f"PostgreSQL exited with status {code} at start")
            try:
                with self.connect_admin(connect_timeout=2):
                    return
            except psycopg.OperationalError:
                pass
            if time.monotonic() > deadline:
                raise PostgresError(f"PostgreSQL on {self.host}:{self.port} did not accept "
                                    f"connections within {START_TIMEOUT:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown by pid (SIGINT, then SIGQUIT, then SIGKILL) and remove the files."""
        with self._lock:
            self._terminate()
        with _running_lock:
            _running.discard(self)

    def _kill_server(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: roll back sessions, checkpoint, exit.
            for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGKILL):
                try:
                    os.kill(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=STOP_GRACE)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._log is not None:
            self._log.close()
            self._log = None
        self.pid = None

    def _terminate(self) -> None:
        self._kill_server()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def _log_tail(self) -> str:
        try:
            text = self.log_text()
        except (OSError, AssertionError):
            return "(no log)"
        return "\n".join(text.splitlines()[-_LOG_TAIL_LINES:]) or "(empty log)"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PostgresCluster(host={self.host!r}, port={self.port}, pid={self.pid})"

    # -- helpers for tests and benchmarks -------------------------------------------------------

    def log_text(self) -> str:
        """Everything the server logged so far (with ``log_statement=all``, every statement)."""
        if self._log is not None:
            self._log.flush()
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
