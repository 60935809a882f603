"""The model: specs, states and their validation. No I/O happens here."""

from kasou.model.spec import (
    DiskSpec,
    NicSpec,
    VMCreate,
    format_size,
    parse_size,
    validate_name,
)
from kasou.model.state import Action, VMState, check_action

__all__ = [
    "Action",
    "DiskSpec",
    "NicSpec",
    "VMCreate",
    "VMState",
    "check_action",
    "format_size",
    "parse_size",
    "validate_name",
]
