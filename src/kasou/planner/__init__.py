"""Consolidation and TCO planning: from an inventory of physical department servers to a host plan.

Pure Python (numpy for the simulation, OR-Tools CP-SAT for the exact packing); no QEMU, no
store. It may import :mod:`kasou.model`, :mod:`kasou.errors` and :mod:`kasou.config`; the CLI
(``kasou plan``) imports it. ``docs/planner.md`` explains the method and the assumptions.
"""

from kasou.planner.inventory import InventoryError, Server, parse_inventory, read_inventory, sample_inventory
from kasou.planner.plan import Options, check_plan, make_plan, parse_reserve
from kasou.planner.prices import PriceSheet, default_prices, parse_prices, read_prices

__all__ = [
    "InventoryError",
    "Options",
    "PriceSheet",
    "Server",
    "check_plan",
    "default_prices",
    "make_plan",
    "parse_inventory",
    "parse_prices",
    "parse_reserve",
    "read_inventory",
    "read_prices",
    "sample_inventory",
]
