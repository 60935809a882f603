"""Criticality classes: when a hospital system must be up. The planner sizes by them; a VM carries one, and
its backups' defaults follow it (the MHLW guideline's example: 5 generations for the medical record
system, 3 for others)."""

from __future__ import annotations

from kasou.errors import InvalidSpec

CLINICAL_24H = "24h-clinical"  # used around the clock in care: records, ordering, the emergency department
BUSINESS_HOURS = "business-hours"  # needed while the departments are open
BATCH = "batch"  # overnight or periodic work (billing runs, reports)
CRITICALITIES = (CLINICAL_24H, BUSINESS_HOURS, BATCH)
ALIASES = {
    "24h": CLINICAL_24H, "24h-clinical": CLINICAL_24H, "clinical": CLINICAL_24H, "24x7": CLINICAL_24H,
    "business": BUSINESS_HOURS, "business-hours": BUSINESS_HOURS, "office": BUSINESS_HOURS,
    "batch": BATCH,
}  # fmt: skip


def parse_criticality(value: str, field: str = "criticality") -> str:
    """A criticality class from its name or an alias (case-insensitive); InvalidSpec naming the classes."""
    c = ALIASES.get(value.strip().lower())
    if c is None:
        raise InvalidSpec(f"criticality must be one of {', '.join(CRITICALITIES)}, not {value!r}", field=field)
    return c
