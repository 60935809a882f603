"""VM states and which action is allowed in which state.

The store records the *intended* state; the host agent reports what QEMU
really does, and the control plane reconciles the two (a VM recorded as
running whose QEMU is gone is ``crashed``; one whose host does not answer is
shown ``unknown``).
"""

from __future__ import annotations

from enum import StrEnum

from kasou.errors import WrongState


class VMState(StrEnum):
    CREATING = "creating"  # the name is reserved; disks are being made
    STOPPED = "stopped"  # defined, no process
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTTING_DOWN = "shutting_down"  # ACPI power button pressed, waiting for the guest
    MIGRATING = "migrating"  # running, and moving to another host
    CRASHED = "crashed"  # its QEMU died without being asked to
    DELETING = "deleting"
    TEMPLATE = "template"  # frozen: a base for linked clones, never started
    # Shown, never stored: the VM was recorded as running (or paused, ...) on a host that does not answer
    # (down, cut off): whether it still runs there nobody can say.
    UNKNOWN = "unknown"


class Action(StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"
    STOP = "stop"
    REBOOT = "reboot"
    PAUSE = "pause"
    RESUME = "resume"
    DELETE = "delete"
    TEMPLATE = "template"
    MIGRATE = "migrate"
    EXPORT = "export"
    MEDIA = "media"  # change the disc in its CD drive (kasou.model.media)
    DEVICES = "change the devices of"  # add, remove or grow a disk or NIC (kasou.control.devices)


_ALLOWED: dict[Action, frozenset[VMState]] = {
    Action.START: frozenset({VMState.STOPPED, VMState.CRASHED}),
    Action.SHUTDOWN: frozenset({VMState.RUNNING}),
    Action.STOP: frozenset({VMState.RUNNING, VMState.PAUSED, VMState.SHUTTING_DOWN, VMState.STARTING}),
    Action.REBOOT: frozenset({VMState.RUNNING}),
    Action.PAUSE: frozenset({VMState.RUNNING}),
    Action.RESUME: frozenset({VMState.PAUSED}),
    Action.DELETE: frozenset({VMState.STOPPED, VMState.CRASHED, VMState.TEMPLATE}),
    Action.TEMPLATE: frozenset({VMState.STOPPED}),
    Action.MIGRATE: frozenset({VMState.RUNNING}),
    Action.EXPORT: frozenset({VMState.STOPPED, VMState.TEMPLATE}),
    Action.MEDIA: frozenset({VMState.RUNNING, VMState.PAUSED, VMState.STOPPED, VMState.CRASHED}),
    Action.DEVICES: frozenset({VMState.STOPPED, VMState.RUNNING}),
}

_HINT: dict[Action, str] = {
    Action.START: "it is already {state}",
    Action.SHUTDOWN: "only a running VM can be shut down",
    Action.STOP: "it is not running",
    Action.REBOOT: "only a running VM can be rebooted",
    Action.PAUSE: "only a running VM can be paused",
    Action.RESUME: "only a paused VM can be resumed",
    Action.DELETE: "stop it first",
    Action.TEMPLATE: "only a stopped VM can become a template",
    Action.MIGRATE: "only a running VM can be live-migrated",
    Action.EXPORT: "only a stopped VM can be exported (shut it down first)",
    Action.MEDIA: "its CD changes when it runs or is stopped: wait until it does",
    Action.DEVICES: "devices change on a running VM (hot-plug) or a stopped one; wait until it is one of the two",
}

# States from which a process exists on a host (or may, while it is changing).
ACTIVE_STATES = frozenset({VMState.STARTING, VMState.RUNNING, VMState.PAUSED, VMState.SHUTTING_DOWN, VMState.MIGRATING})


def allowed(action: Action, state: VMState) -> bool:
    return state in _ALLOWED[action]


def check_action(name: str, action: Action, state: VMState) -> None:
    """Raise WrongState (HTTP 409) unless ``action`` may run on a VM in ``state``."""
    if not allowed(action, state):
        if state == VMState.TEMPLATE and action not in (Action.DELETE, Action.EXPORT):
            hint = "it is a template; create a VM from it with --from"
        elif state == VMState.UNKNOWN:
            hint = "its host does not answer"
        else:
            hint = _HINT[action].format(state=state.value)
        raise WrongState(
            f"cannot {action.value} VM {name!r} while it is {state.value}: {hint}",
            vm=name,
            state=state.value,
            action=action.value,
        )
