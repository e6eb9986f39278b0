"""``rotator exec --agent NAME -- COMMAND``: run an agent with its keys from the vault, not `.env`.

The agent's credentials (every ``[[credentials]]`` whose ``agent`` is NAME) are read from their
vaults and handed to COMMAND as environment variables named after their vault fields (the
companion fields too: an AWS key's access key id); nothing is written to disk. Without
``--watch`` rotator then replaces itself with COMMAND (``exec``), so signals and the exit status
are the command's own. With ``--watch`` it stays as the command's supervisor, like envconsul or
``vault agent``'s process supervisor: it forwards signals, passes the exit status through, polls
the vault, and when a rotation stores a new key it either signals the command (``--signal``,
default SIGHUP, for agents that read the vault themselves) or restarts it with the new keys in
its environment (``--restart``), backing off when the command keeps exiting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rotator.config import CredentialConfig, Policies
from rotator.errors import NotFound, PermanentError
from rotator.interfaces import VaultValue
from rotator.runtime import Runtime

__all__ = ["AgentSecrets", "Supervisor", "exec_agent"]

log = logging.getLogger("rotator.exec")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH)
"""Signals the supervisor passes on to the command (as a shell's job control would)."""
RESTART_BACKOFF_MAX = 60.0
STOP_GRACE = 10.0


class AgentSecrets:
    """The environment variables an agent's credentials give it, read from the vaults."""

    def __init__(self, policies: Policies, runtime: Runtime, agent: str) -> None:
        self.credentials = [c for c in policies.credentials if c.agent == agent]
        self.token = policies.proxy.agents.get(agent) if policies.proxy is not None else None
        """The proxy token the daemon keeps for this agent in a vault, if any."""
        if not self.credentials and self.token is None:
            raise PermanentError(f"{policies.source}: no credential has agent = \"{agent}\" "
                                 "and [proxy.agents] keeps no token for it")
        self.runtime = runtime
        names: dict[str, str] = {}
        for cred in self.credentials:
            for var in (cred.field, *self._companions(cred)):
                if not _ENV_NAME.fullmatch(var):
                    raise PermanentError(
                        f"{cred.name}: vault field {var!r} cannot be an environment variable "
                        "name (letters, digits and _; not starting with a digit)")
                if var in names:
                    raise PermanentError(f"{cred.name} and {names[var]} both give the agent "
                                         f"{var}: give one of them another field")
                names[var] = cred.name

    def _companions(self, cred: CredentialConfig) -> tuple[str, ...]:
        return self.runtime.provider(cred.provider).companion_fields(self.runtime.info(cred))

    def _read(self, vault: str, path: str, field: str,
              companions: tuple[str, ...] = ()) -> VaultValue | None:
        try:
            return self.runtime.vault(vault).read(path, field, companions)
        except NotFound:
            return None

    def read(self) -> dict[str, str]:
        """Variable name -> value, for every credential of the agent; a credential with no
        key in its vault yet is an error (the agent would start without it)."""
        env: dict[str, str] = {}
        for cred in self.credentials:
            current = self._read(cred.vault, cred.path, cred.field, self._companions(cred))
            if current is None or current.secret is None:
                raise PermanentError(
                    f"{cred.name}: vault {cred.vault!r} holds no key at {cred.path}#"
                    f"{cred.field} yet: import it or run a first rotation")
            env[cred.field] = current.secret.reveal()
            env.update(current.companions)
        if self.token is not None:
            kept = self._read(self.token.vault, self.token.path, self.token.field)
            if kept is None or kept.secret is None:
                raise PermanentError(
                    f"no proxy token in vault {self.token.vault!r} at {self.token.path}#"
                    f"{self.token.field} yet: the daemon writes it (rotator run)")
            env[self.token.field] = kept.secret.reveal()
        return env


def fingerprint(env: dict[str, str]) -> str:
    """A digest that changes when any value does (compared in memory; never shown)."""
    digest = hashlib.sha256()
    for name in sorted(env):
        digest.update(name.encode() + b"\0" + env[name].encode() + b"\0")
    return digest.hexdigest()


@dataclass
class WatchOptions:
    poll: float = 10.0
    restart: bool = False
    signal: int = signal.SIGHUP


class Supervisor:
    """Runs the command, forwards signals to it, and acts on a changed key (``--watch``)."""

    def __init__(self, argv: Sequence[str], read: Callable[[], dict[str, str]],
                 options: WatchOptions, base_env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.read = read
        self.options = options
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.child: subprocess.Popen[bytes] | None = None
        self._stopping: int | None = None
        self._backoff = 1.0

    def _start(self, env: dict[str, str]) -> None:
        try:
            self.child = subprocess.Popen(self.argv, env={**self.base_env, **env})
        except OSError as exc:
            raise PermanentError(f"cannot run {self.argv[0]!r}: {exc.strerror}") from None

    def _forward(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
            self._stopping = signum
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signum)

    def _stop_child(self) -> None:
        child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()
        try:
            child.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def run(self) -> int:
        """Supervise until the command exits on its own (its status is returned: a signal's
        death as 128 + the signal, as a shell reports it) or rotator is told to stop."""
        for signum in FORWARDED:
            signal.signal(signum, self._forward)
        env = self.read()
        seen = fingerprint(env)
        self._start(env)
        next_poll = time.monotonic() + self.options.poll
        while True:
            assert self.child is not None
            try:
                code = self.child.wait(timeout=max(next_poll - time.monotonic(), 0.05))
            except subprocess.TimeoutExpired:
                code = None
            if code is not None:
                if self._stopping is not None or not self.options.restart:
                    return 128 - code if code < 0 else code
                # --restart keeps the agent up: a command that exits is started again, later
                # each time it keeps failing.
                log.warning("%s exited with %s; starting it again in %.0fs", self.argv[0],
                            code, self._backoff)
                time.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, RESTART_BACKOFF_MAX)
                env = self.read()
                seen = fingerprint(env)
                self._start(env)
                continue
            if time.monotonic() < next_poll:
                continue
            next_poll = time.monotonic() + self.options.poll
            try:
                env = self.read()
            except Exception as exc:  # a vault hiccup: keep the agent running on what it has
                log.warning("could not read the agent's keys (%s); keeping the running "
                            "command as it is", exc)
                continue
            now = fingerprint(env)
            if now == seen:
                continue
            seen = now
            if self.options.restart:
                log.info("a new key is in the vault: restarting %s with it", self.argv[0])
                self._stop_child()
                self._backoff = 1.0
                self._start(env)
            else:
                log.info("a new key is in the vault: sending %s to %s",
                         signal.Signals(self.options.signal).name, self.argv[0])
                self.child.send_signal(self.options.signal)


def exec_agent(policies: Policies, agent: str, argv: Sequence[str],
               watch: WatchOptions | None) -> int:
    """``rotator exec``: without ``watch`` this process becomes the command (never returns);
    with it, supervise and return the command's exit status."""
    runtime = Runtime(policies)
    try:
        secrets = AgentSecrets(policies, runtime, agent)
        if watch is None:
            env = {**os.environ, **secrets.read()}
            runtime.close()
            try:
                os.execvpe(argv[0], list(argv), env)
            except OSError as exc:
                raise PermanentError(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        return Supervisor(argv, secrets.read, watch).run()
    finally:
        runtime.close()
