"""Run a Python program and count its HTTP requests to the vault (hvac's through requests,
rotator's KV calls through urllib3 directly: both are counted at urllib3's ``urlopen``; the
OpenAI SDK sends with httpx and is not counted).

    python bench/count_vault_calls.py OUT_FILE (-m MODULE | SCRIPT) ARGS...

Writes the count to OUT_FILE at exit. Used by bench/rotate_now.py to show that rotator and the
bare script make the same vault calls (OpenBao does not allow enabling an audit device through
its API, which would otherwise count them server-side).
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys
import threading
from pathlib import Path

import urllib3.connectionpool

out, rest = Path(sys.argv[1]), sys.argv[2:]
count = 0
lock = threading.Lock()
real_urlopen = urllib3.connectionpool.HTTPConnectionPool.urlopen


def counting_urlopen(self, *args, **kwargs):  # type: ignore[no-untyped-def]
    global count
    with lock:
        count += 1
    return real_urlopen(self, *args, **kwargs)


urllib3.connectionpool.HTTPConnectionPool.urlopen = counting_urlopen  # type: ignore[method-assign]
atexit.register(lambda: out.write_text(str(count)))
real_exit = os._exit


def exit_after_writing(code: int) -> None:  # rotator's console script leaves by os._exit
    out.write_text(str(count))
    real_exit(code)


os._exit = exit_after_writing  # type: ignore[assignment]
if rest[0] == "-m":
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
else:
    sys.argv = rest
    runpy.run_path(rest[0], run_name="__main__")
