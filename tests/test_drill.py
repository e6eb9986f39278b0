"""The leak-runbook drill, as an operator runs it from the README: tmux pane 1 runs
``rotator demo --serve``, pane 2 the README's terminal-2 commands verbatim. Every command
succeeds, and the demo's agents see no rejected key."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.support import debian_tool, wait_for

ROOT = Path(__file__).resolve().parent.parent
SECTION = "### Practise the leak runbook"


def _drill_blocks() -> tuple[list[str], list[str]]:
    """The README's two code blocks of the drill: terminal 1's and terminal 2's commands."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    first, second = ([line for line in b.splitlines() if line.strip()] for b in blocks[:2])
    return first, second


def _tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
def test_the_readme_drill_runs_verbatim_with_no_rejected_key(tmp_path):
    debian_tool("tmux", "tmux")
    terminal1, terminal2 = _drill_blocks()
    assert terminal1 == ["rotator demo --serve"]
    assert terminal2[0] == "source rotator-drill.env" and len(terminal2) >= 4
    shutil.copy(ROOT / "rotation-policies.toml", tmp_path)
    session = f"drill-{uuid.uuid4().hex[:8]}"
    # The venv's `rotator` first on PATH, as after the README's set-up command.
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    env = ["env", f"PATH={path}", f"HOME={tmp_path}", "TMPDIR=" + str(tmp_path), "TERM=xterm"]
    _tmux("new-session", "-d", "-s", session, "-x", "220", "-y", "50", "-c", str(tmp_path),
          *env, "bash", "--noprofile", "--norc")
    try:
        demo, shell = f"{session}:0.0", f"{session}:0.1"
        _tmux("split-window", "-t", f"{session}:0", "-c", str(tmp_path), *env,
              "bash", "--noprofile", "--norc")
        _tmux("send-keys", "-t", demo, " ".join(terminal1), "Enter")
        wait_for(lambda: (tmp_path / "rotator-drill.env").exists(), timeout=90,
                 what="the demo to write rotator-drill.env")
        assert (tmp_path / "rotator-drill.env").stat().st_mode & 0o077 == 0, "owner-only"
        for i, command in enumerate(terminal2):
            _tmux("send-keys", "-t", shell, f'{command}; echo "done-{i} rc=$?"', "Enter")
            wait_for(lambda i=i: re.search(rf"done-{i} rc=\d", _tmux(
                "capture-pane", "-p", "-J", "-S", "-3000", "-t", shell)),
                timeout=120, what=f"terminal 2: {command}")
            shown = _tmux("capture-pane", "-p", "-J", "-S", "-3000", "-t", shell)
            assert f"done-{i} rc=0" in shown, f"{command!r} failed:\n{shown}"
        shown = _tmux("capture-pane", "-p", "-J", "-S", "-3000", "-t", shell)
        assert "checked dead at the provider" in shown and "3 rotated, 0 failed" in shown
        assert "1 credential(s), 0 would fail" in shown
        time.sleep(2)  # the agents call on with the new keys
        _tmux("send-keys", "-t", demo, "C-c")
        wait_for(lambda: "rejected key(s)" in _tmux("capture-pane", "-p", "-J", "-S", "-3000",
                                                     "-t", demo),
                 timeout=60, what="the demo to stop")
        final = _tmux("capture-pane", "-p", "-J", "-S", "-3000", "-t", demo)
        match = re.search(r"agents made (\d+) successful call\(s\) and saw (\d+) rejected", final)
        assert match, final
        assert int(match.group(1)) > 0 and match.group(2) == "0", final
        wait_for(lambda: not (tmp_path / "rotator-drill.env").exists(), timeout=30,
                 what="the demo to remove rotator-drill.env")
        wait_for(lambda: not list(tmp_path.glob("rotator-demo-*")), timeout=30,
                 what="the demo to remove its temporary files")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
