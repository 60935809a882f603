"""Placing VMs on hosts: lower bounds, first-fit decreasing with improvement, CP-SAT, and the reserve checker.

The packing problem: items (VMs) with a size per dimension (memory, vCPUs, peak CPU, IOPS) go into
identical bins (hosts) of capacity ``cap``; items of one anti-affinity group never share a bin;
use as few bins as possible.

The failover reserve is built on top (:func:`with_reserve`): ``M`` packed hosts plus ``k`` reserve
hosts. It is sound by construction: the VMs of any ``k`` failed hosts fit the ``k`` reserve
capacities, one failed host's VMs on one empty host, since they fitted on one host before. It is
also optimal when ``M`` is: after ``k`` hosts fail, every VM must run on the other ``H - k``, which is
a packing, so ``H - k >= M*``. :func:`reserve_violations` checks a layout independently by trying to
restart the VMs of every set of ``k`` failed hosts on the survivors.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Size = tuple[int, ...]


@dataclass(frozen=True)
class Item:
    name: str
    size: Size
    group: str | None = None


Layout = list[list[int]]  # per host, the indices of its items


def _fits(load: Sequence[int], size: Size, cap: Size) -> bool:
    return all(a + b <= c for a, b, c in zip(load, size, cap, strict=True))


def _add(load: list[int], size: Size, sign: int = 1) -> None:
    for d, s in enumerate(size):
        load[d] += sign * s


def _norm_max(size: Size, cap: Size) -> float:
    return max(s / c for s, c in zip(size, cap, strict=True))


def _norm_sum(size: Size, cap: Size) -> float:
    return sum(s / c for s, c in zip(size, cap, strict=True))


def fits_empty(item: Item, cap: Size) -> bool:
    return all(s <= c for s, c in zip(item.size, cap, strict=True))


def capacity_lower_bound(items: Sequence[Item], cap: Size) -> int:
    """Hosts needed by the sum of each dimension, and by the largest anti-affinity group."""
    if not items:
        return 0
    dims = len(cap)
    by_dim = max(math.ceil(sum(it.size[d] for it in items) / cap[d]) for d in range(dims))
    groups: dict[str, int] = {}
    for it in items:
        if it.group:
            groups[it.group] = groups.get(it.group, 0) + 1
    return max(by_dim, max(groups.values(), default=0), 1)


class _Bins:
    def __init__(self, items: Sequence[Item], cap: Size) -> None:
        self.items = items
        self.cap = cap
        self.members: list[list[int]] = []
        self.loads: list[list[int]] = []
        self.groups: list[set[str]] = []

    def new(self) -> int:
        self.members.append([])
        self.loads.append([0] * len(self.cap))
        self.groups.append(set())
        return len(self.members) - 1

    def can(self, b: int, i: int) -> bool:
        it = self.items[i]
        return _fits(self.loads[b], it.size, self.cap) and (it.group is None or it.group not in self.groups[b])

    def put(self, b: int, i: int) -> None:
        it = self.items[i]
        self.members[b].append(i)
        _add(self.loads[b], it.size)
        if it.group:
            self.groups[b].add(it.group)

    def take(self, b: int, i: int) -> None:
        it = self.items[i]
        self.members[b].remove(i)
        _add(self.loads[b], it.size, -1)
        if it.group:
            self.groups[b].discard(it.group)

    def fill(self, b: int) -> float:
        return _norm_sum(tuple(self.loads[b]), self.cap)


def first_fit_decreasing(items: Sequence[Item], cap: Size, key: Callable[[Item], float] | None = None) -> Layout:
    """Items largest first (by ``key``, default the largest share of any dimension), each in the first bin it fits."""
    k = key or (lambda it: _norm_max(it.size, cap))
    order = sorted(range(len(items)), key=lambda i: (-k(items[i]), i))
    bins = _Bins(items, cap)
    for i in order:
        for b in range(len(bins.members)):
            if bins.can(b, i):
                bins.put(b, i)
                break
        else:
            if not fits_empty(items[i], cap):
                raise ValueError(f"{items[i].name} does not fit an empty host")
            bins.put(bins.new(), i)
    return bins.members


def improve(layout: Layout, items: Sequence[Item], cap: Size, deadline: float | None = None) -> Layout:
    """Empty the emptiest bins where the others can take their items (best fit); repeat until nothing moves."""
    bins = _Bins(items, cap)
    for members in layout:
        b = bins.new()
        for i in members:
            bins.put(b, i)
    changed = True
    while changed and (deadline is None or time.monotonic() < deadline):
        changed = False
        for b in sorted(range(len(bins.members)), key=bins.fill):
            if not bins.members[b] or (deadline is not None and time.monotonic() > deadline):
                continue
            moved: list[tuple[int, int]] = []
            ok = True
            for i in sorted(bins.members[b], key=lambda i: -_norm_max(items[i].size, cap)):
                best, best_room = -1, math.inf
                for o in range(len(bins.members)):
                    if o == b or not bins.members[o] or not bins.can(o, i):
                        continue
                    room = 1 - bins.fill(o)
                    if room < best_room:
                        best, best_room = o, room
                if best < 0:
                    ok = False
                    break
                bins.take(b, i)
                bins.put(best, i)
                moved.append((i, best))
            if ok:
                changed = True
            else:
                for i, o in reversed(moved):
                    bins.take(o, i)
                    bins.put(b, i)
    return [m for m in bins.members if m]


def heuristic(items: Sequence[Item], cap: Size, time_limit: float = 10.0) -> Layout:
    """The best of first-fit decreasing under several orders, each improved."""
    deadline = time.monotonic() + time_limit
    keys: list[Callable[[Item], float]] = [
        lambda it: _norm_max(it.size, cap),
        lambda it: _norm_sum(it.size, cap),
        lambda it: it.size[0] / cap[0],
    ]
    lower = capacity_lower_bound(items, cap)
    best: Layout | None = None
    for key in keys:
        layout = improve(first_fit_decreasing(items, cap, key), items, cap, deadline)
        if best is None or len(layout) < len(best):
            best = layout
        if len(best) <= lower or time.monotonic() > deadline:
            break
    assert best is not None
    return best


@dataclass(frozen=True)
class ExactResult:
    layout: Layout
    optimal: bool  # proven: no packing uses fewer bins
    bound: int  # proven lower bound on the bins of any packing
    status: str


def exact(items: Sequence[Item], cap: Size, hint: Layout, time_limit: float = 10.0, workers: int = 2) -> ExactResult:
    """CP-SAT: the fewest bins, starting from ``hint``; within ``time_limit`` s, else the best found."""
    from ortools.sat.python import cp_model  # heavy import: only when the exact solver runs

    lower = capacity_lower_bound(items, cap)
    if len(hint) <= lower:
        return ExactResult(hint, True, lower, "optimal (heuristic met the lower bound)")
    n, ub = len(items), len(hint)
    order = sorted(range(n), key=lambda i: (-_norm_max(items[i].size, cap), i))
    rank = {i: r for r, i in enumerate(order)}
    m = cp_model.CpModel()
    # Symmetry: the item of rank r goes in one of the first r + 1 bins.
    x = {(r, b): m.new_bool_var(f"x{r}_{b}") for r in range(n) for b in range(min(r + 1, ub))}
    y = [m.new_bool_var(f"y{b}") for b in range(ub)]
    for r in range(n):
        m.add_exactly_one(x[r, b] for b in range(min(r + 1, ub)))
    for b in range(ub):
        rs = [r for r in range(b, n)]
        for d in range(len(cap)):
            m.add(sum(items[order[r]].size[d] * x[r, b] for r in rs) <= cap[d] * y[b])
        if b + 1 < ub:
            m.add(y[b] >= y[b + 1])
    groups: dict[str, list[int]] = {}
    for r, i in enumerate(order):
        g = items[i].group
        if g:
            groups.setdefault(g, []).append(r)
    for members in groups.values():
        for b in range(ub):
            vs = [x[r, b] for r in members if (r, b) in x]
            if len(vs) > 1:
                m.add_at_most_one(vs)
    m.add(sum(y) >= lower)
    m.minimize(sum(y))
    # Hint: the heuristic's bins, numbered by their first item's rank (keeps the symmetry rule).
    hint_sorted = sorted(hint, key=lambda members: min(rank[i] for i in members))
    where = {rank[i]: b for b, members in enumerate(hint_sorted) for i in members}
    for (r, b), var in x.items():
        m.add_hint(var, where[r] == b)
    for b, var in enumerate(y):
        m.add_hint(var, b < len(hint_sorted))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = max(0.1, time_limit)
    solver.parameters.num_workers = max(1, workers)
    solver.parameters.random_seed = 1
    status = solver.solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return ExactResult(hint, False, lower, "time limit, kept the heuristic's packing")
    bins: dict[int, list[int]] = {}
    for (r, b), var in x.items():
        if solver.boolean_value(var):
            bins.setdefault(b, []).append(order[r])
    layout = [sorted(bins[b]) for b in sorted(bins)]
    if len(layout) > len(hint):
        layout = hint
    bound = max(lower, math.ceil(solver.best_objective_bound - 1e-6))
    optimal = status == cp_model.OPTIMAL or len(layout) <= bound
    return ExactResult(layout, optimal, min(bound, len(layout)), "optimal" if optimal else "feasible (time limit)")


# -- the failover reserve ------------------------------------------------------------------


def with_reserve(packed: Layout, reserve: int, min_hosts: int = 1) -> Layout:
    """The packed hosts plus ``reserve`` empty hosts (more if ``min_hosts`` asks)."""
    return [list(m) for m in packed] + [[] for _ in range(max(reserve, min_hosts - len(packed)))]


def spread(layout: Layout, items: Sequence[Item], cap: Size) -> Layout | None:
    """The same VMs over the same number of hosts, balanced (most free share first, largest VM first),
    as kasou's scheduler would run them; None if they do not all fit that way."""
    bins = _Bins(items, cap)
    for _ in layout:
        bins.new()
    every = [i for members in layout for i in members]
    for i in sorted(every, key=lambda i: (-_norm_max(items[i].size, cap), i)):
        best, best_fill = -1, math.inf
        for b in range(len(bins.members)):
            if bins.can(b, i):
                f = _norm_max(tuple(bins.loads[b]), cap)
                if f < best_fill:
                    best, best_fill = b, f
        if best < 0:
            return None
        bins.put(best, i)
    return [sorted(m) for m in bins.members]


def _loaded(layout: Layout, items: Sequence[Item], cap: Size) -> _Bins:
    bins = _Bins(items, cap)
    for members in layout:
        b = bins.new()
        for i in members:
            bins.put(b, i)
    return bins


def restart_placement(
    layout: Layout, items: Sequence[Item], cap: Size, failed: Sequence[int], loaded: _Bins | None = None
) -> dict[int, int] | None:
    """Where the VMs of the ``failed`` hosts can restart on the others (item -> host), or None if the
    strategies tried (a failed host's VMs together on one survivor; best fit; most free first) find no way."""
    down = set(failed)
    survivors = [h for h in range(len(layout)) if h not in down]
    base = _loaded(layout, items, cap) if loaded is None else loaded

    def attempt(strategy: str) -> dict[int, int] | None:
        bins = _Bins(items, cap)
        bins.members = [list(m) for m in base.members]
        bins.loads = [list(ld) for ld in base.loads]
        bins.groups = [set(g) for g in base.groups]
        placed: dict[int, int] = {}
        pending: list[int] = []
        if strategy == "block":
            for h in sorted(down, key=lambda h: -bins.fill(h)):
                host_items = layout[h]
                if not host_items:
                    continue
                need = [sum(items[i].size[d] for i in host_items) for d in range(len(cap))]
                gs = {items[i].group for i in host_items if items[i].group}
                roomy = sorted(survivors, key=bins.fill)
                target = next(
                    (s for s in roomy if _fits(bins.loads[s], tuple(need), cap) and not gs & bins.groups[s]), None
                )
                if target is None:
                    pending.extend(host_items)
                    continue
                for i in host_items:
                    bins.put(target, i)
                    placed[i] = target
        else:
            pending = [i for h in down for i in layout[h]]
        for i in sorted(pending, key=lambda i: (-_norm_max(items[i].size, cap), i)):
            best, best_score = -1, math.inf
            for s in survivors:
                if not bins.can(s, i):
                    continue
                room = 1 - bins.fill(s)
                score = room if strategy != "worst" else -(cap[0] - bins.loads[s][0])
                if score < best_score:
                    best, best_score = s, score
            if best < 0:
                return None
            bins.put(best, i)
            placed[i] = best
        return placed

    for strategy in ("block", "best", "worst"):
        result = attempt(strategy)
        if result is not None:
            return result
    return None


def layout_violations(layout: Layout, items: Sequence[Item], cap: Size) -> list[str]:
    """Every item placed once, no host over capacity, no anti-affinity group twice on a host."""
    problems: list[str] = []
    seen: dict[int, int] = {}
    for h, members in enumerate(layout):
        load = [0] * len(cap)
        groups: set[str] = set()
        for i in members:
            if i in seen:
                problems.append(f"{items[i].name} is on hosts {seen[i]} and {h}")
            seen[i] = h
            _add(load, items[i].size)
            g = items[i].group
            if g:
                if g in groups:
                    problems.append(f"host {h} runs two VMs of anti-affinity group {g!r}")
                groups.add(g)
        for d, (used, c) in enumerate(zip(load, cap, strict=True)):
            if used > c:
                problems.append(f"host {h} dimension {d}: {used} > capacity {c}")
    missing = [items[i].name for i in range(len(items)) if i not in seen]
    if missing:
        problems.append(f"not placed: {', '.join(missing[:5])}")
    return problems


def reserve_violations(
    layout: Layout, items: Sequence[Item], cap: Size, reserve: int, first_only: bool = False
) -> list[str]:
    """The sets of ``reserve`` failed hosts whose VMs find no restart placement on the others
    (with ``first_only``, stop at the first)."""
    problems: list[str] = []
    loaded = _loaded(layout, items, cap)
    k = min(reserve, len(layout))
    if reserve > 0 and len(layout) <= reserve and any(layout):
        return [f"{len(layout)} hosts cannot keep a reserve of {reserve}"]
    for failed in itertools.combinations(range(len(layout)), k):
        if not any(layout[h] for h in failed):
            continue
        if restart_placement(layout, items, cap, failed, loaded) is None:
            problems.append(f"losing hosts {', '.join(str(h) for h in failed)} leaves no room to restart their VMs")
            if first_only:
                break
    return problems
