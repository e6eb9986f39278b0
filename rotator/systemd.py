"""systemd integration without libsystemd: sd_notify(3) messages and ``LoadCredential=`` paths.

Under ``Type=notify`` systemd waits for ``READY=1`` before it calls the unit started, and with
``WatchdogSec=`` it restarts a daemon that stops sending ``WATCHDOG=1``. The protocol is one
AF_UNIX datagram of newline-separated ``KEY=VALUE`` lines sent to ``$NOTIFY_SOCKET``; writing it
here keeps rotator free of a C dependency. Every function is a no-op returning False when the
process does not run under systemd, and none of them ever raises: a lost notification must not
stop a rotation.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time

from rotator.errors import PermanentError

__all__ = [
    "CREDENTIALS_DIRECTORY",
    "expand_credentials_directory",
    "notify",
    "ready",
    "reloading",
    "status",
    "stopping",
    "watchdog",
    "watchdog_interval",
]

log = logging.getLogger(__name__)

CREDENTIALS_DIRECTORY = "CREDENTIALS_DIRECTORY"
_CREDENTIALS_REF = re.compile(r"^\$(?:\{CREDENTIALS_DIRECTORY\}|CREDENTIALS_DIRECTORY\b)")
_warned = False


def notify(*fields: str) -> bool:
    """Send ``fields`` (``KEY=VALUE`` each) to ``$NOTIFY_SOCKET``.

    Returns True when the datagram was sent; False without a socket (not under systemd, or an
    address family other than AF_UNIX) or when sending failed, which is logged once as a warning
    and then at debug level so a broken socket cannot flood the log every watchdog period.
    """
    global _warned
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace
    elif not address.startswith("/"):
        log.debug("NOTIFY_SOCKET %r is not an AF_UNIX path; not notifying systemd", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall("\n".join(fields).encode())
    except OSError as exc:
        level = logging.DEBUG if _warned else logging.WARNING
        _warned = True
        log.log(level, "could not notify systemd (%s): %s", fields[0] if fields else "",
                exc.strerror or exc)
        return False
    return True


def ready(text: str | None = None) -> bool:
    """The daemon serves: systemd finishes ``systemctl start`` and starts dependent units."""
    return notify("READY=1", *_status_field(text))


def reloading() -> bool:
    """A reload began; send :func:`ready` when it is done. ``MONOTONIC_USEC`` is what
    ``Type=notify-reload`` (systemd 253+) requires; older managers ignore it."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping(text: str | None = None) -> bool:
    """Shutdown began, so systemd shows ``deactivating`` while the steps in flight finish."""
    return notify("STOPPING=1", *_status_field(text))


def status(text: str) -> bool:
    """One line ``systemctl status`` shows under the unit (no secret belongs in it)."""
    return notify(*_status_field(text))


def watchdog_interval() -> float | None:
    """Seconds between :func:`watchdog` calls: half of ``WatchdogSec=``, as sd_watchdog_enabled(3)
    advises; None when no watchdog is armed for this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None  # armed for another process (we were started by it)
    return usec / 2_000_000


def watchdog() -> bool:
    """Tell systemd the daemon is alive; does nothing unless a watchdog is armed for us."""
    if watchdog_interval() is None:
        return False
    return notify("WATCHDOG=1")


def expand_credentials_directory(path: str) -> str:
    """``path`` with a leading ``$CREDENTIALS_DIRECTORY`` or ``${CREDENTIALS_DIRECTORY}``
    replaced by the directory systemd's ``LoadCredential=`` fills for this service.

    Only that variable, only at the start, so policy files stay free of general shell
    expansion. Raises :class:`PermanentError` saying what to do when the path names it but the
    process was not started with credentials.
    """
    match = _CREDENTIALS_REF.match(path)
    if match is None:
        return path
    directory = os.environ.get(CREDENTIALS_DIRECTORY, "")
    if not directory:
        raise PermanentError(
            f"{path} names $CREDENTIALS_DIRECTORY, which is not set: systemd sets it for a "
            "unit with LoadCredential=; elsewhere give the file's real path")
    return directory.rstrip("/") + path[match.end():]


def _status_field(text: str | None) -> list[str]:
    return [] if text is None else ["STATUS=" + " ".join(text.split())]
