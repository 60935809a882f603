from __future__ import annotations

import pytest

from kasou.errors import WrongState
from kasou.model.state import Action, VMState, allowed, check_action


def test_transitions_table() -> None:
    assert allowed(Action.START, VMState.STOPPED)
    assert allowed(Action.START, VMState.CRASHED)
    assert not allowed(Action.START, VMState.RUNNING)
    assert allowed(Action.SHUTDOWN, VMState.RUNNING)
    assert not allowed(Action.SHUTDOWN, VMState.PAUSED)
    assert allowed(Action.STOP, VMState.PAUSED)
    assert allowed(Action.RESUME, VMState.PAUSED)
    assert not allowed(Action.DELETE, VMState.RUNNING)
    assert allowed(Action.DELETE, VMState.TEMPLATE)
    assert allowed(Action.EXPORT, VMState.TEMPLATE)  # a template's disk is read, never changed
    assert allowed(Action.EXPORT, VMState.STOPPED)
    assert not allowed(Action.EXPORT, VMState.RUNNING)
    for action in Action:
        if action not in (Action.DELETE, Action.EXPORT):
            assert not allowed(action, VMState.TEMPLATE)


@pytest.mark.parametrize("state", list(VMState))
@pytest.mark.parametrize("action", list(Action))
def test_refusals_are_one_line_and_name_the_state(action: Action, state: VMState) -> None:
    if allowed(action, state):
        check_action("vm1", action, state)
        return
    with pytest.raises(WrongState) as e:
        check_action("vm1", action, state)
    assert state.value in e.value.message
    assert "\n" not in e.value.message
