"""The transition table (rotator.protocol) is the one place the step order is written: every
step leads somewhere on success and on failure, every step is reachable, and the engine has a
method for each."""

from __future__ import annotations

from rotator.engine import Engine
from rotator.protocol import PHASES, PROTOCOL, STEPS


def test_every_step_has_a_successor_for_success_and_failure():
    for step, transition in PROTOCOL.items():
        successors = [transition.on_success, *transition.branches.values()]
        assert all(s in STEPS or s in PHASES for s in successors), step
        if transition.on_failure is None:
            # Only the clean-up stays put on failure: it is retried until it finishes.
            assert step == "rollback", f"{step} has nowhere to go when it fails"
        else:
            assert transition.on_failure in STEPS, step
        assert callable(getattr(Engine, f"_step_{step}", None)), f"no Engine._step_{step}"


def test_every_step_is_reachable_and_every_path_ends_done():
    seen, todo = set(), ["prepare"]
    while todo:
        step = todo.pop()
        if step in seen or step in PHASES:
            continue
        seen.add(step)
        transition = PROTOCOL[step]
        todo += [transition.on_success, *transition.branches.values()]
        todo += [transition.on_failure] if transition.on_failure else []
    assert seen == set(STEPS)
    assert PROTOCOL["rollback"].on_success == "done"
    assert PROTOCOL["grace"].on_success == "revoke", "the old key dies only after grace"
    assert PROTOCOL["health"].failure_outcome == "rolled_back"
