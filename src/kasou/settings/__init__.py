"""kasou's settings: one typed model (:mod:`kasou.settings.model`) read from the environment, then the TOML
file /etc/kasou/kasou.toml (or ``KASOU_CONFIG``), then the defaults. docs/configuration.md lists every key.

:func:`current` gives the settings of this moment (cached on the environment and the file's modification
time, so a change to either is seen at once) with where each value came from; a bad value raises its own
one-line :class:`~kasou.errors.InvalidSetting` only where that key is read.
"""

from __future__ import annotations

from kasou.settings.load import Loaded, Origin, current, load
from kasou.settings.model import BY_DOTTED, BY_ENV, KEYS, SECTIONS, Key, Settings, show
from kasou.settings.sources import CONFIG_ENV, DEFAULT_FILE, OTHER_VARIABLES, config_path

__all__ = [
    "BY_DOTTED", "BY_ENV", "CONFIG_ENV", "DEFAULT_FILE", "KEYS", "OTHER_VARIABLES", "SECTIONS", "Key", "Loaded",
    "Origin", "Settings", "config_path", "current", "load", "show",
]  # fmt: skip
