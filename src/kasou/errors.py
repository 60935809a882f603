"""kasou's one error tree.

Every error kasou raises on purpose derives from :class:`KasouError`. Each
carries a one-line ``message`` meant for a person, a machine-readable
``code`` and optional ``details``. The HTTP mapping lives in exactly one place
(:mod:`kasou.wire`) and the CLI prints ``message`` on one line.

::

    KasouError
     ├── InvalidSpec            bad input: a name, a size, a count (HTTP 422)
     │    └── InventoryError    a planner inventory file that cannot be read (kasou.planner)
     ├── InvalidSetting         a setting (KASOU_* variable, key of /etc/kasou/kasou.toml) kasou cannot use
     ├── NotFound               no such VM / image / job / host (HTTP 404)
     │    └── ImageNotFound
     ├── Conflict               exists already, or the wrong state (HTTP 409)
     │    ├── AlreadyExists
     │    ├── WrongState
     │    └── BackupCorrupt     a backup file fails its verification; nothing is restored from it
     ├── InsufficientResources  the host cannot take it (HTTP 507 → 409 family)
     ├── TooLarge               a request body over the API's bound (HTTP 413)
     ├── RateLimited            too many failed tries from one place: wait (HTTP 429, Retry-After)
     ├── Unauthorized           no or a wrong token or password (HTTP 401)
     ├── Forbidden              signed in, but not allowed to (HTTP 403)
     ├── HypervisorError        QEMU refused or died (HTTP 502)
     │    ├── QemuStartError
     │    ├── MonitorError
     │    ├── AccelProbeError
     │    └── GuestAgentError   the guest agent did not answer in time, or answered with an error
     ├── ImageError             building or reading a guest image failed
     ├── TlsError               TLS files missing or unusable (kasou.pki)
     ├── LabError               the lab on this machine (kasou.lab)
     ├── StoreError             the state store failed (HTTP 503)
     │    └── StoreConflict     a compare-and-swap lost a race
     ├── AgentUnavailable       the host agent does not answer (HTTP 503)
     └── OperationTimeout       a bounded wait ran out (HTTP 504)
"""

from __future__ import annotations

from typing import Any


class KasouError(Exception):
    """Root of every error kasou raises deliberately."""

    code = "error"

    def __init__(self, message: str, **details: Any) -> None:
        # One line only: the CLI and the API print it as it is.
        self.message = " ".join(str(message).split())
        self.details = details
        super().__init__(self.message)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class InvalidSpec(KasouError):
    code = "invalid_spec"


class InvalidSetting(KasouError, ValueError):
    """A setting (a ``KASOU_*`` environment variable or a key of the settings file) holds a value kasou cannot
    use, or is unknown, or the file cannot be read: the message names the variable or key, the value and
    what is allowed (kasou.settings). A server that reads it answers 500 (its own set-up is
    wrong). It is a ValueError too, for callers that read a setting with ``except ValueError``."""

    code = "invalid_setting"


class NotFound(KasouError):
    code = "not_found"


class ImageNotFound(NotFound):
    code = "image_not_found"


class Conflict(KasouError):
    code = "conflict"


class AlreadyExists(Conflict):
    code = "already_exists"


class WrongState(Conflict):
    code = "wrong_state"


class BackupCorrupt(Conflict):
    code = "backup_corrupt"


class InsufficientResources(KasouError):
    code = "insufficient_resources"


class TooLarge(KasouError):
    code = "too_large"


class RateLimited(KasouError):
    """Too many failed attempts from one source: ``details.retry_after_s`` says when to try again."""

    code = "rate_limited"


class Unauthorized(KasouError):
    code = "unauthorized"


class Forbidden(KasouError):
    """Signed in, but this user may not do that (or see that VM)."""

    code = "forbidden"


class HypervisorError(KasouError):
    code = "hypervisor_error"


class QemuStartError(HypervisorError):
    code = "qemu_start_failed"


class MonitorError(HypervisorError):
    code = "monitor_error"


class AccelProbeError(HypervisorError):
    code = "accel_probe_failed"


class GuestAgentError(HypervisorError):
    code = "guest_agent_error"


class ImageError(KasouError):
    code = "image_error"


class StoreError(KasouError):
    code = "store_error"


class StoreConflict(StoreError):
    code = "store_conflict"


class AgentUnavailable(KasouError):
    code = "agent_unavailable"


class OperationTimeout(KasouError):
    code = "timeout"


class DirectoryUnavailable(KasouError):
    """The hospital's directory (LDAP / Active Directory) did not answer, or not in time."""

    code = "directory_unavailable"


# Map from code back to class, so a client can re-raise what a server sent.
_BY_CODE: dict[str, type[KasouError]] = {}


def _register(cls: type[KasouError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(KasouError)


def from_dict(data: dict[str, Any]) -> KasouError:
    """Rebuild an error sent over the wire (agent → control plane → CLI)."""
    cls = _BY_CODE.get(str(data.get("code")), KasouError)
    details = data.get("details") or {}
    return cls(str(data.get("message", "unknown error")), **details)
