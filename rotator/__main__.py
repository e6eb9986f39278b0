"""``python -m rotator``: the same as the ``rotator`` console script (where no script is on
PATH: a container without the venv's bin, a quick check from a checkout)."""

from __future__ import annotations

from rotator.cli import console_main

if __name__ == "__main__":
    console_main()
