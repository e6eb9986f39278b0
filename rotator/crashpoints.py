"""Fail points for crash tests: kill the process with SIGKILL at a named point.

They live in the product (not in ``rotator.testing``) because the product calls them: the
crash-recovery tests run the real daemon and kill it from inside, at each protocol step.

Set ``ROTATOR_CRASHPOINT`` to a point name (for example ``after:store`` or ``effect:create``)
and the process dies there exactly as it would under ``kill -9``. Unset, this costs one
dictionary lookup per step.
"""

from __future__ import annotations

import os
import signal

ENV = "ROTATOR_CRASHPOINT"


def crashpoint(name: str) -> None:
    """Die with SIGKILL if ``$ROTATOR_CRASHPOINT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
