"""The price sheet: host models, power, rack, storage, software, maintenance and reliability figures.

The defaults are the shipped ``samples/prices.toml`` (one source of truth, with the assumptions
written beside each figure). A user's sheet changes only the keys it gives; ``[[host_models]]``
in it replaces the whole list. Every value is checked: a bad one is one line naming the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kasou.errors import InvalidSpec
from kasou.model.names import validate_name
from kasou.planner.inventory import sample_text


@dataclass(frozen=True)
class Cycle:
    years: int = 6


@dataclass(frozen=True)
class Policy:
    headroom: float = 0.2
    cpu_target: float = 0.8
    vcpu_ratio: float = 4.0
    rightsize: bool = True
    min_vcpus: int = 2
    min_memory_gib: int = 2
    min_hosts: int = 3


@dataclass(frozen=True)
class HostModel:
    name: str
    cores: int
    clock_ghz: float
    memory_gib: int
    iops: int
    rack_u: int
    price_yen: int
    idle_w: float
    max_w: float


@dataclass(frozen=True)
class Power:
    yen_per_kwh: float = 30
    pue: float = 1.7


@dataclass(frozen=True)
class Rack:
    yen_per_u_per_year: float = 30000


@dataclass(frozen=True)
class Network:
    switches: int = 2
    switch_price_yen: float = 1200000
    switch_w: float = 150


@dataclass(frozen=True)
class Storage:
    yen_per_tib: float = 90000
    copies: int = 2
    free_margin: float = 0.3
    watts_per_tib: float = 6


@dataclass(frozen=True)
class Software:
    os_per_server_yen_per_year: float = 60000
    os_per_vm_yen_per_year: float = 60000
    platform_per_host_yen_per_year: float = 0
    support_per_host_yen_per_year: float = 300000
    backup_yen_per_year: float = 600000


@dataclass(frozen=True)
class Maintenance:
    host_rate_per_year: float = 0.08
    physical_base_yen: float = 900000
    physical_per_core_yen: float = 30000
    physical_per_gib_yen: float = 5000
    physical_per_tib_yen: float = 60000
    migration_per_server_yen: float = 400000


@dataclass(frozen=True)
class Availability:
    runs: int = 2000
    server_mtbf_h: float = 60000
    host_mtbf_h: float = 60000
    aging_after_years: float = 5
    aging_per_year: float = 0.25
    server_mttr_h: float = 8
    host_mttr_h: float = 8
    disk_afr: float = 0.015
    raid_rebuild_h: float = 24
    mirror_rebuild_h: float = 6
    restore_h: float = 12
    failover_s: float | None = None  # None: the recorded bench/failover.py result (planner.availability)
    guest_boot_s: float = 180
    hw_stops_per_year: float = 1
    hw_stop_h: float = 3
    os_reboots_per_year: float = 4
    physical_reboot_min: float = 15
    vm_reboot_min: float = 4
    business_hours_share: float = 0.3
    batch_share: float = 0.1


@dataclass(frozen=True)
class PriceSheet:
    cycle: Cycle = field(default_factory=Cycle)
    policy: Policy = field(default_factory=Policy)
    host_models: tuple[HostModel, ...] = ()
    power: Power = field(default_factory=Power)
    rack: Rack = field(default_factory=Rack)
    network: Network = field(default_factory=Network)
    storage: Storage = field(default_factory=Storage)
    software: Software = field(default_factory=Software)
    maintenance: Maintenance = field(default_factory=Maintenance)
    availability: Availability = field(default_factory=Availability)

    def replace(self, **sections: Any) -> PriceSheet:
        return dataclasses.replace(self, **sections)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Keys whose value must stay within a range (inclusive), beyond "a number >= 0".
_RANGES: dict[str, tuple[float, float]] = {
    "cycle.years": (1, 20),
    "policy.headroom": (0, 2),
    "policy.cpu_target": (0.05, 1),
    "policy.vcpu_ratio": (0.1, 64),
    "policy.min_vcpus": (1, 255),
    "policy.min_memory_gib": (1, 4096),
    "policy.min_hosts": (1, 1000),
    "power.pue": (1, 5),
    "storage.copies": (1, 4),
    "storage.free_margin": (0, 0.95),
    "availability.runs": (1, 1_000_000),
    "availability.server_mtbf_h": (1, 1e9),
    "availability.host_mtbf_h": (1, 1e9),
    "availability.disk_afr": (0, 1),
    "availability.business_hours_share": (0, 1),
    "availability.batch_share": (0, 1),
    "host_models.cores": (1, 4096),
    "host_models.memory_gib": (1, 65536),
    "host_models.rack_u": (1, 48),
    "host_models.clock_ghz": (0.1, 10),
}


def _value(where: str, key: str, raw: Any, kind: Any, source: str) -> Any:
    rng = _RANGES.get(f"{where}.{key}")
    if kind is bool or kind == "bool":
        if not isinstance(raw, bool):
            raise InvalidSpec(f"{source}: {where}.{key} must be true or false, not {raw!r}", field=f"{where}.{key}")
        return raw
    if kind is str or kind == "str":
        if not isinstance(raw, str):
            raise InvalidSpec(f"{source}: {where}.{key} must be a string, not {raw!r}", field=f"{where}.{key}")
        return raw
    whole = kind is int or kind == "int"
    if isinstance(raw, bool) or not isinstance(raw, int | float) or (whole and not float(raw).is_integer()):
        what = "a whole number" if whole else "a number"
        raise InvalidSpec(f"{source}: {where}.{key} must be {what}, not {raw!r}", field=f"{where}.{key}")
    low, high = rng or (0, 1e15)
    if not low <= raw <= high:
        raise InvalidSpec(f"{source}: {where}.{key} must be between {low:g} and {high:g}, not {raw}",
                          field=f"{where}.{key}")  # fmt: skip
    return int(raw) if whole else float(raw)


def _section(cls: type[Any], where: str, data: Any, base: Any, source: str) -> Any:
    if not isinstance(data, dict):
        raise InvalidSpec(f"{source}: [{where}] must be a table", field=where)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InvalidSpec(f"{source}: unknown key {where}.{unknown[0]} (known: {', '.join(fields)})", field=where)
    values = {} if base is None else dataclasses.asdict(base)
    for key, raw in data.items():
        values[key] = _value(where, key, raw, fields[key].type, source)
    missing = [k for k in fields if k not in values]
    if missing:
        raise InvalidSpec(f"{source}: {where} lacks {', '.join(missing)}", field=where)
    return cls(**values)


_SECTIONS: dict[str, type[Any]] = {
    "cycle": Cycle, "policy": Policy, "power": Power, "rack": Rack, "network": Network, "storage": Storage,
    "software": Software, "maintenance": Maintenance, "availability": Availability,
}  # fmt: skip


def parse_prices(text: str, source: str = "prices", base: PriceSheet | None = None) -> PriceSheet:
    """A price sheet from TOML text, over ``base`` (every key must be known and valid)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InvalidSpec(f"{source} is not valid TOML: {e}", field="prices") from None
    sheet = base or PriceSheet()
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key == "host_models":
            if not isinstance(value, list) or not value:
                raise InvalidSpec(f"{source}: host_models must be a non-empty list of [[host_models]]",
                                  field="host_models")  # fmt: skip
            models = tuple(_section(HostModel, "host_models", m, None, source) for m in value)
            names = [m.name for m in models]
            for n in names:
                validate_name(n, "host model name")
            if len(set(names)) != len(names):
                raise InvalidSpec(f"{source}: two host models share a name", field="host_models")
            for m in models:
                if m.max_w < m.idle_w:
                    raise InvalidSpec(f"{source}: host model {m.name}: max_w is below idle_w", field="host_models")
            changes["host_models"] = models
        elif key in _SECTIONS:
            changes[key] = _section(_SECTIONS[key], key, value, getattr(sheet, key), source)
        else:
            raise InvalidSpec(f"{source}: unknown section [{key}] (known: {', '.join(['host_models', *_SECTIONS])})",
                              field="prices")  # fmt: skip
    sheet = sheet.replace(**changes)
    if not sheet.host_models:
        raise InvalidSpec(f"{source}: no host models", field="host_models")
    return sheet


def default_prices_text() -> str:
    return sample_text("prices.toml")


def default_prices() -> PriceSheet:
    return parse_prices(default_prices_text(), "the default price sheet")


def read_prices(path: str | Path | None) -> PriceSheet:
    """The default sheet, changed by the file at ``path`` if one is given."""
    base = default_prices()
    if path is None:
        return base
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidSpec(f"price sheet {p} does not exist", field="prices") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidSpec(f"price sheet {p} cannot be read: {e}", field="prices") from None
    return parse_prices(text, str(p), base)
