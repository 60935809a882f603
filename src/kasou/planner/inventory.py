"""The inventory of physical department servers: a CSV file, its schema, and the checks of every row.

One row per physical server. A bad row is never dropped: :func:`parse_inventory` collects one
line per problem (``line 7: cores must be a whole number >= 1, not 'x'``) and raises
:class:`InventoryError` listing them all, so a person fixes the file in one pass.
``docs/planner.md`` documents the columns; :data:`COLUMNS` is the same table in code.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from kasou.errors import InvalidSpec
from kasou.model.criticality import ALIASES, CRITICALITIES
from kasou.model.names import validate_name


@dataclass(frozen=True)
class Column:
    name: str
    required: bool
    meaning: str


COLUMNS: tuple[Column, ...] = (
    Column("name", True, "server name; becomes the VM name (a kasou name: letters, digits, '-', '_', '.')"),
    Column("department", True, "the department or system, e.g. EMR, PACS, lab"),
    Column("vendor", False, "the vendor that maintains the system"),
    Column("cores", True, "physical CPU cores (whole number >= 1)"),
    Column("clock_ghz", True, "CPU clock in GHz (> 0)"),
    Column("memory_gib", True, "installed memory in GiB (> 0)"),
    Column("disk_gib", True, "used disk capacity in GiB (>= 0)"),
    Column("iops", True, "measured peak disk I/O operations per second (>= 0)"),
    Column("cpu_peak_pct", True, "measured peak CPU use, percent of the server's cores (0-100)"),
    Column("cpu_avg_pct", True, "average CPU use, percent (0-100, at most the peak)"),
    Column("mem_peak_pct", True, "measured peak memory use, percent (0-100)"),
    Column("mem_avg_pct", True, "average memory use, percent (0-100, at most the peak)"),
    Column("criticality", True, "24h-clinical, business-hours or batch (also: 24h, business)"),
    Column("power_w", True, "average power draw in watts (> 0)"),
    Column("age_years", True, "age of the hardware in years (>= 0)"),
    Column("maint_yen_per_year", True, "yearly hardware maintenance contract in yen (>= 0)"),
    Column("anti_affinity", False, "group name: servers sharing it (a primary and its standby) run on different hosts"),
    Column(
        "replacement_yen", False, "price of a like-for-like replacement in yen (default: the price sheet's formula)"
    ),
    Column("rack_u", False, "rack units the server takes (default 2)"),
)
REQUIRED = tuple(c.name for c in COLUMNS if c.required)
KNOWN = {c.name for c in COLUMNS}


@dataclass(frozen=True)
class Server:
    """One physical department server, as measured."""

    name: str
    department: str
    vendor: str
    cores: int
    clock_ghz: float
    memory_gib: float
    disk_gib: float
    iops: int
    cpu_peak_pct: float
    cpu_avg_pct: float
    mem_peak_pct: float
    mem_avg_pct: float
    criticality: str
    power_w: float
    age_years: float
    maint_yen_per_year: int
    anti_affinity: str | None = None
    replacement_yen: int | None = None
    rack_u: int = 2
    line: int = 0  # the CSV line it came from (0: made in code)


class InventoryError(InvalidSpec):
    """Bad rows in an inventory; ``problems`` has one line each (``line N: reason``)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        n = len(problems)
        super().__init__(f"{source}: {n} problem{'s' if n != 1 else ''}; nothing planned", problems=problems)
        self.problems = problems


class _Row:
    """Reads the fields of one row, collecting problems instead of stopping at the first."""

    def __init__(self, line: int, data: dict[str, str], problems: list[str]) -> None:
        self.line = line
        self.data = data
        self.problems = problems
        self.ok = True

    def bad(self, text: str) -> None:
        self.ok = False
        self.problems.append(f"line {self.line}: {text}")

    def text(self, col: str) -> str:
        return (self.data.get(col) or "").strip()

    def number(self, col: str, low: float, high: float = math.inf, *, whole: bool = False,
               default: float | None = None, low_open: bool = False) -> float:  # fmt: skip
        raw = self.text(col)
        if not raw:
            if default is not None:
                return default
            self.bad(f"{col} is empty")
            return low
        raw = raw.replace(",", "").replace("_", "")
        try:
            value = float(raw)
        except ValueError:
            kind = "a whole number" if whole else "a number"
            self.bad(f"{col} must be {kind}, not {self.text(col)!r}")
            return low
        if not math.isfinite(value) or (whole and value != int(value)):
            self.bad(f"{col} must be {'a whole number' if whole else 'a finite number'}, not {self.text(col)!r}")
            return low
        below = value <= low if low_open else value < low
        if below or value > high:
            rel = ">" if low_open else ">="
            if high == math.inf:
                rng = f"{rel} {low:g}"
            else:
                rng = f"> {low:g} and at most {high:g}" if low_open else f"between {low:g} and {high:g}"
            self.bad(f"{col} must be {rng}, not {self.text(col)}")
            return low
        return value


def _parse_row(row: _Row) -> Server | None:
    name = row.text("name")
    try:
        validate_name(name, "name")
    except InvalidSpec as e:
        row.bad(e.message)
    department = row.text("department")
    if not department:
        row.bad("department is empty")
    crit_raw = row.text("criticality").lower()
    crit = ALIASES.get(crit_raw)
    if crit is None:
        row.bad(f"criticality must be one of {', '.join(CRITICALITIES)}, not {row.text('criticality')!r}")
    group = row.text("anti_affinity") or None
    if group is not None:
        try:
            validate_name(group, "anti_affinity")
        except InvalidSpec as e:
            row.bad(e.message)
    cores = int(row.number("cores", 1, 1024, whole=True))
    clock = row.number("clock_ghz", 0, 10, low_open=True)
    memory = row.number("memory_gib", 0, 16384, low_open=True)
    disk = row.number("disk_gib", 0, 10_000_000)
    iops = int(row.number("iops", 0, 100_000_000, whole=True))
    cpu_peak = row.number("cpu_peak_pct", 0, 100)
    cpu_avg = row.number("cpu_avg_pct", 0, 100)
    mem_peak = row.number("mem_peak_pct", 0, 100)
    mem_avg = row.number("mem_avg_pct", 0, 100)
    power = row.number("power_w", 0, 100_000, low_open=True)
    age = row.number("age_years", 0, 100)
    maint = int(row.number("maint_yen_per_year", 0, 1e12, whole=True))
    repl_raw = row.text("replacement_yen")
    replacement = int(row.number("replacement_yen", 0, 1e12, whole=True)) if repl_raw else None
    rack_u = int(row.number("rack_u", 1, 48, whole=True, default=2))
    if row.ok and cpu_avg > cpu_peak:
        row.bad(f"cpu_avg_pct ({cpu_avg:g}) is above cpu_peak_pct ({cpu_peak:g})")
    if row.ok and mem_avg > mem_peak:
        row.bad(f"mem_avg_pct ({mem_avg:g}) is above mem_peak_pct ({mem_peak:g})")
    if not row.ok or crit is None:
        return None
    return Server(
        name=name, department=department, vendor=row.text("vendor"), cores=cores, clock_ghz=clock,
        memory_gib=memory, disk_gib=disk, iops=iops, cpu_peak_pct=cpu_peak, cpu_avg_pct=cpu_avg,
        mem_peak_pct=mem_peak, mem_avg_pct=mem_avg, criticality=crit, power_w=power, age_years=age,
        maint_yen_per_year=maint, anti_affinity=group, replacement_yen=replacement, rack_u=rack_u, line=row.line,
    )  # fmt: skip


def parse_inventory(text: str, source: str = "inventory") -> list[Server]:
    """Every server of a CSV inventory, or :class:`InventoryError` with every problem found.

    Blank lines and lines starting with ``#`` are comments. Unknown columns are refused
    (a misspelt column would otherwise be silently ignored).
    """
    lines = text.splitlines()
    # Keep the file's line numbers: comments and blank lines become empty CSV lines, skipped below.
    cleaned = ["" if (not ln.strip() or ln.lstrip().startswith("#")) else ln for ln in lines]
    problems: list[str] = []
    header_at = next((i for i, ln in enumerate(cleaned) if ln), None)
    if header_at is None:
        raise InventoryError(source, ["the file has no header line and no servers"])
    reader = csv.reader(io.StringIO("\n".join(cleaned[header_at:])))
    try:  # the csv module's own refusals (a NUL, a field over its 128 KiB limit) are the file's problems too
        rows = list(reader)
    except csv.Error as e:
        raise InventoryError(source, [f"line {header_at + reader.line_num}: {e}"]) from None
    header = [h.strip().lower() for h in (rows[0] if rows else [])]
    missing = [c for c in REQUIRED if c not in header]
    unknown = [c for c in header if c not in KNOWN]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if missing:
        problems.append(f"line {header_at + 1}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if unknown:
        problems.append(f"line {header_at + 1}: unknown column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if dupes:
        problems.append(f"line {header_at + 1}: column{'s' if len(dupes) > 1 else ''} twice: {', '.join(dupes)}")
    if problems:
        raise InventoryError(source, problems)
    servers: list[Server] = []
    seen: dict[str, int] = {}
    for offset, fields in enumerate(rows[1:], start=1):
        line = header_at + 1 + offset
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) != len(header):
            problems.append(f"line {line}: {len(fields)} fields, the header has {len(header)}")
            continue
        row = _Row(line, dict(zip(header, fields, strict=True)), problems)
        server = _parse_row(row)
        if server is None:
            continue
        if server.name in seen:
            problems.append(f"line {line}: name {server.name!r} is already used on line {seen[server.name]}")
            continue
        seen[server.name] = line
        servers.append(server)
    groups: dict[str, list[Server]] = {}
    for s in servers:
        if s.anti_affinity:
            groups.setdefault(s.anti_affinity, []).append(s)
    for g, members in groups.items():
        if len(members) == 1:
            problems.append(
                f"line {members[0].line}: anti-affinity group {g!r} has only this server; "
                "give the same group to its partner (primary/standby) or leave it empty"
            )
    if not servers and not problems:
        problems.append("the file has a header but no servers")
    if problems:
        raise InventoryError(source, problems)
    return servers


def read_inventory(path: str | Path) -> list[Server]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidSpec(f"inventory {p} does not exist", field="inventory") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"inventory {p} cannot be read: {e}", field="inventory") from None
    return parse_inventory(text, str(p))


def sample_text(name: str = "hospital-400.csv") -> str:
    """A file shipped with kasou in ``kasou/planner/samples``."""
    return resources.files("kasou.planner").joinpath("samples").joinpath(name).read_text(encoding="utf-8")


def sample_inventory() -> list[Server]:
    """The sample: a typical 400-bed Japanese hospital's department servers."""
    return parse_inventory(sample_text(), "hospital-400.csv")


def to_csv(servers: Iterable[Server]) -> str:
    """Servers back to CSV (the schema's column order)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c.name for c in COLUMNS])
    fmt: Callable[[Any], str] = lambda v: "" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))  # noqa: E731
    for s in servers:
        w.writerow([fmt(getattr(s, c.name)) for c in COLUMNS])
    return buf.getvalue()
