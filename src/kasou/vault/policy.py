"""Retention and locks (docs/backup-server.md, "Policy, pruning, garbage collection"), set on the backup
server alone: the policy model, which generations a prune keeps (a pure function), and prune, garbage
collection and verification over a :class:`~kasou.vault.store.Store`.

Generations are placed in days, ISO weeks and months by the time the server **received** them (its own
clock, not the ``created`` a client wrote), in the server's local time zone.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kasou.errors import InvalidSpec, NotFound
from kasou.model.names import validate_name
from kasou.model.retention import Counts, Decision, Held
from kasou.model.retention import select as retention_select
from kasou.vault import immutable
from kasou.vault.index import chunk_ids
from kasou.vault.store import Store, read_json, write_json

DAY_S = 86400.0
GC_GRACE_S = DAY_S
LIMITS = {"keep_daily": 3660, "keep_weekly": 520, "keep_monthly": 1200, "lock_days": 36500}


@dataclass(frozen=True)
class Retention:
    """What a prune keeps of one VM, and how long a new generation is locked. Defaults: the MHLW guideline's
    example (5 daily, 4 weekly, 12 monthly, locked for 30 days). With all three keep counts 0 a prune keeps
    everything."""

    keep_daily: int = 5
    keep_weekly: int = 4
    keep_monthly: int = 12
    lock_days: int = 30

    def __post_init__(self) -> None:
        for name, top in LIMITS.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= top:
                raise InvalidSpec(f"{name.replace('_', '-')} must be a whole number from 0 to {top}", field=name)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Retention:
        unknown = set(data) - set(LIMITS)
        if unknown:
            raise InvalidSpec(f"unknown policy setting {sorted(unknown)[0]}", field="policy")
        return cls(**data)


@dataclass(frozen=True)
class Policy:
    default: Retention = field(default_factory=Retention)
    vms: dict[str, Retention] = field(default_factory=dict)

    def for_vm(self, vm: str) -> Retention:
        return self.vms.get(vm, self.default)

    def to_dict(self) -> dict[str, Any]:
        return {"default": asdict(self.default), "vms": {k: asdict(v) for k, v in sorted(self.vms.items())}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Policy:
        vms = {validate_name(k, "vm"): Retention.from_dict(v) for k, v in (data.get("vms") or {}).items()}
        return cls(Retention.from_dict(data.get("default") or {}), vms)


def load_policy(store: Store) -> Policy:
    path = store.root / "policy.json"
    if not path.exists():
        return Policy()
    return Policy.from_dict(read_json(path))


def save_policy(store: Store, policy: Policy) -> None:
    write_json(store.root / "policy.json", policy.to_dict())


def set_policy(store: Store, vm: str | None = None, reset: bool = False, **changes: int | None) -> Policy:
    """Change the default policy, or one VM's (starting from the default); ``reset``: the VM follows the
    default again. Settings given as None stay as they are."""
    given = {k: v for k, v in changes.items() if v is not None}
    with store.locked():
        policy = load_policy(store)
        if vm is None:
            if reset:
                raise InvalidSpec("--reset is for one VM's policy (give --vm)", field="vm")
            policy = Policy(replace(policy.default, **given), policy.vms)
        else:
            validate_name(vm, "vm")
            vms = dict(policy.vms)
            if reset:
                vms.pop(vm, None)
            else:
                vms[vm] = replace(policy.for_vm(vm), **given)
            policy = Policy(policy.default, vms)
        save_policy(store, policy)
    store.event("policy_set", vm=vm, reset=reset, **given)
    return policy


def add_generation(store: Store, index: dict[str, Any], **extra_state: Any) -> dict[str, Any]:
    """Add a generation locked as this server's policy says for its VM (never as the client says)."""
    vm = index.get("vm") if isinstance(index, dict) else None
    days = load_policy(store).for_vm(vm).lock_days if isinstance(vm, str) else Retention().lock_days
    return store.add_generation(index, store.clock() + days * DAY_S, **extra_state)


# -- which generations a prune keeps (kasou.model.retention) ---------------------------------------


def select(held: Iterable[Held], retention: Retention, now: float, tz: dt.tzinfo | None = None) -> list[Decision]:
    """Which of one VM's generations a prune keeps (:func:`kasou.model.retention.select`; no keep-last: the
    server keeps by days, weeks and months). Every generation still locked at ``now`` is kept. Newest first."""
    counts = Counts(0, retention.keep_daily, retention.keep_weekly, retention.keep_monthly)
    return retention_select(held, counts, now, tz)


# -- over the store --------------------------------------------------------------------------------


def held(store: Store, vm: str) -> list[Held]:
    out = []
    for gen in store.generation_numbers(vm):
        s = store.state(vm, gen)
        out.append(Held(gen, float(s.get("received") or 0.0), s.get("locked_until")))
    return out


def prune(store: Store, dry_run: bool = False, vm: str | None = None, tz: dt.tzinfo | None = None
          ) -> dict[str, list[Decision]]:  # fmt: skip
    """Apply each VM's retention; returns the decisions per VM (``dry_run``: nothing removed). A removed
    generation's index and state go; its chunks stay for :func:`gc` (their immutable flag is cleared once
    no generation refers to them)."""
    policy = load_policy(store)
    now = store.clock()
    result: dict[str, list[Decision]] = {}
    for name in [vm] if vm else store.vms():
        decisions = select(held(store, name), policy.for_vm(name), now, tz)
        result[name] = decisions
        if dry_run:
            continue
        for d in decisions:
            if not d.keep:
                store.remove_generation(name, d.generation)
                store.event("pruned", vm=name, generation=d.generation)
    if not dry_run:
        release_unreferenced(store)
    return result


def referenced(store: Store) -> set[str]:
    ids: set[str] = set()
    for vm in store.vms():
        for gen in store.generation_numbers(vm):
            ids |= chunk_ids(store.index(vm, gen))
    return ids


def release_unreferenced(store: Store) -> int:
    """Clear the immutable flag of chunks no generation refers to any more (so gc may remove them)."""
    if not store.immutable:
        return 0
    keep = referenced(store)
    n = 0
    for cid, path in store.chunk_files():
        if cid not in keep and immutable.is_immutable(path):
            immutable.set_immutable(path, False)
            n += 1
    return n


@dataclass
class GcResult:
    removed: int = 0
    removed_bytes: int = 0
    kept_young: int = 0
    referenced: int = 0


def gc(store: Store, grace_s: float = GC_GRACE_S, dry_run: bool = False) -> GcResult:
    """Remove chunks no generation refers to and older than ``grace_s`` (a chunk uploaded for a generation
    not added yet is kept), and temporary files a crash left behind as old."""
    now = store.clock()
    with store.locked():  # no generation is added meanwhile: one naming a chunk about to go would be refused
        keep = referenced(store)
        res = GcResult(referenced=len(keep))
        for cid, path in store.chunk_files():
            if cid in keep:
                continue
            st = path.stat()
            if now - st.st_mtime < grace_s:
                res.kept_young += 1
                continue
            res.removed += 1
            res.removed_bytes += st.st_size
            if not dry_run:
                store.remove_chunk(cid)
        if not dry_run:
            for dirpath, _dirs, files in os.walk(store.root):
                for name in files:
                    p = os.path.join(dirpath, name)
                    if name.startswith(".") and name.endswith(".tmp") and now - os.stat(p).st_mtime > grace_s:
                        os.unlink(p)
    if not dry_run:
        store.event("gc", removed=res.removed, removed_bytes=res.removed_bytes, kept_young=res.kept_young)
    return res


# -- verification -----------------------------------------------------------------------------------


@dataclass
class Verified:
    vm: str
    generation: int
    chunks: int
    damaged: list[str]


def verify(store: Store, vm: str | None = None, all_: bool = False, since_days: float | None = None
           ) -> list[Verified]:  # fmt: skip
    """Re-hash every chunk of generations against their stored SHA-256 (no key needed). Which: ``all_``
    every one; ``since_days`` those not verified within that many days; else those never verified. Each is
    marked ``verified_at`` (sound) or ``damaged`` (the chunk ids that failed), with an event."""
    now = store.clock()
    known: dict[str, bool] = {}  # a chunk shared by generations is read once per run
    out = []
    vms = [vm] if vm else store.vms()
    if vm and not store.generation_numbers(vm):
        raise NotFound(f"no generations of {vm}")
    for name in vms:
        for gen in store.generation_numbers(name):
            state = store.state(name, gen)
            last = state.get("verified_at")
            if not all_:
                if since_days is None and last is not None:
                    continue
                if since_days is not None and last is not None and now - last < since_days * DAY_S:
                    continue
            ids = sorted(chunk_ids(store.index(name, gen)))
            bad = []
            for cid in ids:
                if cid not in known:
                    known[cid] = store.chunk_sound(cid)
                if not known[cid]:
                    bad.append(cid)

            def mark(s: dict[str, Any], bad: list[str] = bad) -> None:
                s["damaged"] = bad
                if not bad:
                    s["verified_at"] = now

            store.update_state(name, gen, mark)
            if bad:
                store.event("damaged", vm=name, generation=gen, chunks=len(bad), first=bad[0])
            else:
                store.event("verified", vm=name, generation=gen, chunks=len(ids))
            out.append(Verified(name, gen, len(ids), bad))
    return out
