"""Balancing decisions: which running VMs to move so that the hosts' CPU and memory pressure even out.

Pure functions over hosts and VMs (no I/O), like :mod:`kasou.control.scheduler`, so they are tested on
skewed clusters without any hypervisor, and the same scoring serves the balancer (:mod:`kasou.control.balance`)
and maintenance mode (each evacuated VM goes to the host its arrival leaves least loaded).

*Pressure* of a host, in percent: memory is what its running VMs take (guest RAM plus QEMU's overhead) of what
VMs may use (total minus the host's reserve, :func:`kasou.control.scheduler.host_reserve_mib`); CPU is what its
VMs were measured to use (in host CPUs) of its CPUs. The *spread* of a resource is its highest pressure minus its
lowest among the hosts that take part (up, out of maintenance). The cluster is balanced when both spreads are
within the threshold.

The plan is greedy (as VMware DRS's): while a spread exceeds the threshold, take of all allowed moves the one that
lowers the sum of the squared pressures most, and carry on from the hosts as that move leaves them, up to
``max_moves``. A move is allowed when the target can take the VM (memory never overcommitted, the vCPU ratio,
anti-affinity: :func:`kasou.control.scheduler.why_not`), the HA reserve still holds after it (the HA VMs of any
one host could still restart on the others; only checked if it held before), neither spread grows beyond the
threshold, and the target's pressure after the move stays at least ``hysteresis`` points below the source's
before it: a move always closes the gap between its two hosts by more than the margin, and the sum of squares
falls with every move, so no sequence of plans on unchanged loads can move a VM back and forth. A VM that the
balancer moved is not moved again within the cool-down (its blocker says so, from the record the balancer keeps).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from kasou.control import scheduler
from kasou.control.ha import n_plus_one_violation

RESOURCES = ("cpu", "memory")


@dataclass(frozen=True)
class BalanceHost:
    name: str
    cpus: int
    memory_total_mib: int
    #: None: takes part (up, out of maintenance); else why not (its VMs neither move nor count).
    excluded: str | None = None

    @property
    def memory_capacity_mib(self) -> int:
        return self.memory_total_mib - scheduler.host_reserve_mib(self.memory_total_mib)


@dataclass(frozen=True)
class BalanceVM:
    name: str
    host: str
    memory_mib: int
    vcpus: int
    cpu_cores: float = 0.0  # measured: host CPUs it kept busy (1.0 = one CPU all the time)
    group: str | None = None  # anti-affinity group
    ha: bool = False
    blocker: str | None = None  # why it may not be moved (busy, snapshots, local disks, cool-down), or None

    @property
    def memory_need_mib(self) -> int:
        return self.memory_mib + scheduler.VM_OVERHEAD_MIB


@dataclass(frozen=True)
class Policy:
    threshold: float = 20.0  # points of pressure spread tolerated
    hysteresis: float = 5.0  # points by which a move must close the gap between its two hosts
    max_moves: int = 8
    vcpu_ratio: float = scheduler.DEFAULT_VCPU_RATIO


class Move(BaseModel):
    vm: str
    source: str
    target: str
    resource: str  # the resource whose spread it answers: cpu or memory
    reason: str
    spread_before: float  # of that resource, in points
    spread_after: float


class Plan(BaseModel):
    moves: list[Move] = []
    spread_before: dict[str, float] = {}  # per resource, in points
    spread_after: dict[str, float] = {}
    pressure_before: dict[str, dict[str, float]] = {}  # host -> resource -> percent
    pressure_after: dict[str, dict[str, float]] = {}
    held: dict[str, str] = {}  # VM -> why it is not moved (only VMs of hosts that take part)
    excluded: dict[str, str] = {}  # host -> why it takes no part
    summary: str = ""


@dataclass
class _State:
    hosts: dict[str, BalanceHost]
    vms: dict[str, BalanceVM]
    where: dict[str, str] = field(default_factory=dict)  # VM -> host as planned
    members: dict[str, list[str]] = field(default_factory=dict)  # host -> its VMs as planned
    mem: dict[str, int] = field(default_factory=dict)  # host -> MiB its VMs take (with overhead)
    cpu: dict[str, float] = field(default_factory=dict)  # host -> host CPUs its VMs use

    def __post_init__(self) -> None:
        self.members = {h: [] for h in self.hosts}
        self.mem = dict.fromkeys(self.hosts, 0)
        self.cpu = dict.fromkeys(self.hosts, 0.0)
        for v in self.vms.values():
            self._add(v, v.host)

    def _add(self, v: BalanceVM, host: str, sign: int = 1) -> None:
        self.where[v.name] = host
        if sign > 0:
            self.members[host].append(v.name)
        else:
            self.members[host].remove(v.name)
        self.mem[host] += sign * v.memory_need_mib
        self.cpu[host] += sign * v.cpu_cores

    def move(self, name: str, target: str) -> None:
        v = self.vms[name]
        self._add(v, self.where[name], -1)
        self._add(v, target)

    def on(self, host: str) -> list[BalanceVM]:
        return [self.vms[n] for n in self.members[host]]

    def pressure(self, host: str, extra: BalanceVM | None = None, less: BalanceVM | None = None) -> dict[str, float]:
        """``host``'s pressure as planned, with ``extra`` added or ``less`` (one of its VMs) taken away."""
        h = self.hosts[host]
        mem, cpu = self.mem[host], self.cpu[host]
        for v, sign in ((extra, 1), (less, -1)):
            if v is not None:
                mem += sign * v.memory_need_mib
                cpu += sign * v.cpu_cores
        return {
            "cpu": 100.0 * max(cpu, 0.0) / max(h.cpus, 1),
            "memory": 100.0 * mem / max(h.memory_capacity_mib, 1),
        }

    def load(self, host: str) -> scheduler.HostLoad:
        h = self.hosts[host]
        load = scheduler.HostLoad(h.name, h.cpus, h.memory_total_mib, schedulable=h.excluded is None)
        for v in self.on(host):
            load.add(v.memory_mib, v.vcpus, v.group)
        return load


def spreads(pressures: dict[str, dict[str, float]]) -> dict[str, float]:
    """Highest minus lowest pressure of each resource (0 with fewer than two hosts)."""
    out = {}
    for r in RESOURCES:
        values = [p[r] for p in pressures.values()]
        out[r] = round(max(values) - min(values), 1) if len(values) > 1 else 0.0
    return out


def _rounded(p: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {h: {r: round(v, 1) for r, v in rs.items()} for h, rs in p.items()}


def plan(hosts: list[BalanceHost], vms: list[BalanceVM], policy: Policy) -> Plan:
    """The ordered moves that bring the spread within ``policy.threshold`` (or as near as allowed), each with
    its reason; VMs that may not move and hosts that take no part, with why."""
    excluded = {h.name: h.excluded for h in hosts if h.excluded is not None}
    state = _State({h.name: h for h in hosts}, {v.name: v for v in vms if v.host in {h.name for h in hosts}})
    part = sorted(h.name for h in hosts if h.excluded is None)
    held = {v.name: v.blocker for v in state.vms.values() if v.blocker is not None and v.host in part}
    before = {h: state.pressure(h) for h in part}
    result = Plan(pressure_before=_rounded(before), spread_before=spreads(before), held=held, excluded=excluded)
    ha_ok_before = _ha_violation(state, policy.vcpu_ratio) is None
    moved: set[str] = set()
    stop = ""
    while True:
        now = {h: state.pressure(h) for h in part}
        spread = spreads(now)
        resource = max(RESOURCES, key=lambda r: spread[r])
        if spread[resource] <= policy.threshold:
            stop = (
                f"balanced: spreads cpu {spread['cpu']:g}, memory {spread['memory']:g} points, "
                f"within {policy.threshold:g}"
            )
            break
        if len(result.moves) >= policy.max_moves:
            stop = (
                f"stopped after {policy.max_moves} moves (the limit per round); "
                f"{resource} spread {spread[resource]:g} points"
            )
            break
        move = _best_move(state, part, now, spread, resource, policy, moved, ha_ok_before)
        if move is None:
            stop = (
                f"{resource} spread {spread[resource]:g} points is above {policy.threshold:g}, but no allowed move "
                f"closes it by more than {policy.hysteresis:g} points"
                + (f" ({len(held)} VMs may not move)" if held else "")
            )
            break
        result.moves.append(move)
        moved.add(move.vm)
        state.move(move.vm, move.target)
    after = {h: state.pressure(h) for h in part}
    result.pressure_after = _rounded(after)
    result.spread_after = spreads(after)
    result.summary = stop
    return result


def _ha_violation(state: _State, ratio: float, vm: BalanceVM | None = None, target: str | None = None) -> str | None:
    """Why the HA reserve would not hold with ``vm`` on ``target`` (as planned otherwise), or None."""
    where = dict(state.where)
    if vm is not None and target is not None:
        where[vm.name] = target
    placed: dict[str, list[scheduler.Request]] = {}
    for v in state.vms.values():
        if v.ha:
            placed.setdefault(where[v.name], []).append(scheduler.Request(v.name, v.memory_mib, v.vcpus, v.group))
    if not placed:
        return None
    loads = {
        name: scheduler.HostLoad(h.name, h.cpus, h.memory_total_mib, schedulable=h.excluded is None)
        for name, h in state.hosts.items()
    }
    for v in state.vms.values():
        loads[where[v.name]].add(v.memory_mib, v.vcpus, v.group)
    # A host that takes no part counts only with VMs on it (its HA VMs' restarts need room elsewhere).
    kept = [ld for name, ld in loads.items() if state.hosts[name].excluded is None or ld.memory_used_mib]
    return n_plus_one_violation(kept, placed, ratio)


def _spreads_with(
    ends: dict[str, list[tuple[float, str]]], source: str, src: dict[str, float], target: str, dst: dict[str, float]
) -> dict[str, float]:
    """The spreads once a move changed ``source`` to ``src`` and ``target`` to ``dst`` (as :func:`spreads`)."""
    out = {}
    for r in RESOURCES:
        others = [v for v, h in ends[r] if h != source and h != target]
        values = [src[r], dst[r]] + ([others[0], others[-1]] if others else [])
        out[r] = round(max(values) - min(values), 1)
    return out


def _best_move(
    state: _State,
    part: list[str],
    now: dict[str, dict[str, float]],
    spread: dict[str, float],
    resource: str,
    policy: Policy,
    moved: set[str],
    ha_ok_before: bool,
) -> Move | None:
    candidates: list[tuple[float, int, str, str, dict[str, float], dict[str, float]]] = []
    # Each resource's three highest and three lowest hosts: a trial's spread without going over every host.
    ends = {r: sorted((p[r], h) for h, p in now.items()) for r in RESOURCES}
    ends = {r: v[:3] + v[-3:] if len(v) > 6 else v for r, v in ends.items()}
    # From the hosts above the mean of the resource whose spread is widest, to those below it.
    mean = sum(now[h][resource] for h in part) / max(len(part), 1)
    sources = [h for h in part if now[h][resource] >= mean]
    targets = [h for h in part if now[h][resource] < mean]
    for source in sources:
        for vm in state.on(source):
            if vm.blocker is not None or vm.name in moved:
                continue
            src_after = state.pressure(source, less=vm)
            for target in targets:
                dst_after = state.pressure(target, extra=vm)
                # The gap between the two hosts closes by more than the margin (no ping-pong).
                if dst_after[resource] > now[source][resource] - policy.hysteresis:
                    continue
                new = _spreads_with(ends, source, src_after, target, dst_after)
                if any(new[r] > max(spread[r], policy.threshold) for r in RESOURCES):
                    continue  # it would unbalance the other resource beyond the threshold
                gain = sum(
                    now[source][r] ** 2 - src_after[r] ** 2 + now[target][r] ** 2 - dst_after[r] ** 2 for r in RESOURCES
                )
                if gain <= 0:
                    continue
                candidates.append((gain, vm.memory_mib, vm.name, target, src_after, dst_after))
    # Most gain first; on a tie the smaller VM (a shorter migration), then by name (a stable plan).
    candidates.sort(key=lambda c: (-round(c[0], 6), c[1], c[2], c[3]))
    for _gain, _mem, name, target, src_after, dst_after in candidates:
        vm = state.vms[name]
        req = scheduler.Request(vm.name, vm.memory_mib, vm.vcpus, vm.group)
        if scheduler.why_not(state.load(target), req, policy.vcpu_ratio) is not None:
            continue
        if ha_ok_before and _ha_violation(state, policy.vcpu_ratio, vm, target) is not None:
            continue
        source = state.where[name]
        trial = dict(now)
        trial[source], trial[target] = src_after, dst_after
        new = spreads(trial)
        what = "memory" if resource == "memory" else "CPU"
        reason = (
            f"{what} pressure {source} {now[source][resource]:.0f}% vs {target} {now[target][resource]:.0f}% "
            f"(spread {spread[resource]:g} > {policy.threshold:g}): after the move {source} "
            f"{src_after[resource]:.0f}%, {target} {dst_after[resource]:.0f}%"
        )
        return Move(vm=name, source=source, target=target, resource=resource, reason=reason,
                    spread_before=spread[resource], spread_after=new[resource])  # fmt: skip
    return None


def pressure_after(load: scheduler.HostLoad, req: scheduler.Request) -> tuple[float, float]:
    """A host's memory and vCPU pressure (fractions) once ``req`` is placed on it: the placement score."""
    mem = (load.memory_used_mib + req.memory_mib + scheduler.VM_OVERHEAD_MIB) / max(load.memory_capacity_mib, 1)
    cpu = (load.vcpus_used + req.vcpus) / max(load.cpus, 1)
    return mem, cpu


def place_spread(
    req: scheduler.Request, hosts: list[scheduler.HostLoad], vcpu_ratio: float = scheduler.DEFAULT_VCPU_RATIO
) -> scheduler.HostLoad:
    """The host that ``req`` leaves least loaded (lowest memory pressure after it, then vCPU pressure), among
    those that can take it; a refusal names what binds. Maintenance places each evacuated VM so, counting the
    ones placed before it, so a host's VMs spread over all the others by load instead of filling one."""
    best: scheduler.HostLoad | None = None
    best_score = (0.0, 0.0)
    for h in hosts:
        if scheduler.why_not(h, req, vcpu_ratio) is not None:
            continue
        score = pressure_after(h, req)
        if best is None or score < best_score:
            best, best_score = h, score
    if best is None:
        raise scheduler.refusal(req, hosts, vcpu_ratio)
    return best
