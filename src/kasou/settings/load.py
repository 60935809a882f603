"""Reading the settings: the sources merged, each value checked on its own, and where each came from."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from kasou.errors import InvalidSetting
from kasou.settings.model import BY_DOTTED, BY_ENV, KEYS, SECTIONS, Detail, Key, Settings
from kasou.settings.sources import (
    config_path,
    env_values,
    host_env,
    host_env_stamp,
    nearest,
    read_file,
    unknown_env,
)


@dataclass(frozen=True)
class Origin:
    """Where a value came from: ``default``, ``file`` (``where`` is its path) or ``environment`` (the variable)."""

    source: Literal["default", "file", "environment"]
    where: str = ""

    def __str__(self) -> str:
        return self.source if self.source == "default" else f"{self.source} {self.where}"


@dataclass
class Loaded:
    """The settings of one moment: the model (a bad key holds its default), each key's raw value and origin,
    and what is wrong. :meth:`get` raises a key's own error; :meth:`problems` lists every error."""

    settings: Settings
    file: Path
    file_state: str  # "read", "absent", "not read"
    raw: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, Origin] = field(default_factory=dict)
    errors: dict[str, InvalidSetting] = field(default_factory=dict)
    fatal: InvalidSetting | None = None  # the file cannot be read: nothing from it is used
    unknown: list[InvalidSetting] = field(default_factory=list)  # keys and variables kasou does not know

    def origin(self, dotted: str) -> Origin:
        return self.origins.get(dotted, Origin("default"))

    def require(self, *dotted: str) -> None:
        if self.fatal is not None:
            raise self.fatal
        for d in dotted:
            if d in self.errors:
                raise self.errors[d]

    def get(self, dotted: str) -> Any:
        """A key's value (``section.name``), or its one-line error."""
        self.require(dotted)
        section, name = dotted.split(".", 1)
        return getattr(getattr(self.settings, section), name)

    def section(self, name: str) -> Any:
        """A whole section (a frozen model), or the first error among its keys."""
        self.require(*(k.dotted for k in SECTIONS[name]))
        return getattr(self.settings, name)

    def problems(self) -> list[InvalidSetting]:
        """Every error: the file's, each bad key's (in the model's order), each unknown name's."""
        first = [self.fatal] if self.fatal is not None else []
        return first + [self.errors[k.dotted] for k in KEYS if k.dotted in self.errors] + self.unknown


def bad_value(key: Key, raw: Any, origin: Origin, allowed: str | None = None, detail: str = "") -> InvalidSetting:
    """The one line for a value kasou cannot use: the key as it was given, the value, what is allowed."""
    shown = f"<hidden, {len(str(raw))} characters>" if key.kind == "secret" else repr(raw)  # never a secret
    if origin.source == "environment":  # "KASOU_X" or "KASOU_X in /etc/kasou/cluster.env"
        head = f"{key.env}={shown}" + origin.where.removeprefix(key.env)
    else:
        head = f"{key.dotted}={shown} in {origin.where}"
    what = f"{detail}; " if detail else ""
    return InvalidSetting(
        f"{head} is not allowed: {what}{allowed or key.allowed} (default {key.default_text()})",
        setting=key.env, key=key.dotted,
    )  # fmt: skip


def _file_values(data: dict[str, Any], path: Path) -> tuple[dict[str, dict[str, Any]], list[InvalidSetting]]:
    """The file's known keys by section; an error for each unknown table or key (with the nearest name)."""
    values: dict[str, dict[str, Any]] = {}
    unknown: list[InvalidSetting] = []
    dotted_names = list(BY_DOTTED)
    for section, table in data.items():
        if section in SECTIONS and isinstance(table, dict):
            names = [k.name for k in SECTIONS[section]]
            for name, value in table.items():
                if name in names:
                    values.setdefault(section, {})[name] = value
                else:
                    hint = nearest(f"{section}.{name}", dotted_names) or nearest(name, names)
                    unknown.append(InvalidSetting(f"{path}: [{section}] {name} is no setting of kasou{hint}"))
        elif section in SECTIONS:
            unknown.append(InvalidSetting(f"{path}: {section} must be a table ([{section}] and its keys)"))
        else:
            by_name = {k.name: k.dotted for k in KEYS}
            hint = nearest(section, list(SECTIONS)) or (
                f" (did you mean {by_name[section]}?)" if section in by_name else nearest(section, dotted_names)
            )
            unknown.append(InvalidSetting(f"{path}: {section} is no section or setting of kasou{hint}"))
    return values, unknown


def load(environ: Mapping[str, str], path: Path | None = None, named: bool | None = None) -> Loaded:
    """Read the settings from ``environ`` and the file (``path``; by default the one ``environ`` names)."""
    if path is None:
        path, named = config_path(environ)
    named = bool(named)
    fatal: InvalidSetting | None = None
    names = {env: (k.section, k.name) for env, k in BY_ENV.items()}
    unknown = unknown_env(environ, names)
    try:
        data = read_file(path, named)
    except InvalidSetting as e:
        data, fatal = None, e
    file_values, file_unknown = _file_values(data, path) if data else ({}, [])
    unknown = file_unknown + unknown

    raw: dict[str, Any] = {}
    origins: dict[str, Origin] = {}
    merged: dict[str, dict[str, Any]] = {}
    layers: list[tuple[dict[str, dict[str, Any]], Origin | Path | None]] = [(file_values, Origin("file", str(path)))]
    for env_file, file_env in host_env(environ):  # the services' environment files, under the process's own
        unknown += unknown_env({k: v for k, v in file_env.items() if k not in environ}, names)
        layers.append((env_values(file_env, names), env_file))
    layers.append((env_values(environ, names), None))
    for layer, where in layers:
        for section, table in layer.items():
            for name, value in table.items():
                key = BY_DOTTED[f"{section}.{name}"]
                merged.setdefault(section, {})[name] = value
                raw[key.dotted] = value
                if isinstance(where, Origin):
                    origins[key.dotted] = where
                else:
                    origins[key.dotted] = Origin("environment", key.env if where is None else f"{key.env} in {where}")

    errors: dict[str, InvalidSetting] = {}
    sections: dict[str, Any] = {}
    for name, f in Settings.model_fields.items():
        model = f.annotation
        assert isinstance(model, type) and issubclass(model, BaseModel)
        given = dict(merged.get(name, {}))
        for _ in range(len(given) + 1):  # each round drops the keys that failed; defaults never fail
            try:
                sections[name] = model.model_validate(given)
                break
            except ValidationError as e:
                for err in e.errors():
                    dotted = f"{name}.{err['loc'][0]}" if err["loc"] else ""
                    if dotted in raw and given.pop(str(err["loc"][0]), None) is not None:
                        cause = (err.get("ctx") or {}).get("error")
                        detail = str(cause) if isinstance(cause, Detail) else ""
                        errors.setdefault(
                            dotted, bad_value(BY_DOTTED[dotted], raw[dotted], origins[dotted], None, detail)
                        )
    # each section checked on its own (BaseSettings' own validation would read the sources again)
    settings = Settings.model_construct(**sections)
    _cross_checks(settings, raw, origins, errors)
    state = "read" if data is not None else ("not read" if fatal else "absent")
    return Loaded(settings, path, state, raw, origins, errors, fatal, unknown)


def _cross_checks(
    s: Settings, raw: dict[str, Any], origins: dict[str, Origin], errors: dict[str, InvalidSetting]
) -> None:
    """The bounds that depend on another key."""
    if "ha.fence_margin" in raw and "ha.fence_margin" not in errors and s.ha.fence_margin > s.ha.lease_ttl / 2:
        key = BY_DOTTED["ha.fence_margin"]
        allowed = f"a number from 0.5 to {s.ha.lease_ttl / 2:g} (half of ha.lease_ttl)"
        errors[key.dotted] = bad_value(key, raw[key.dotted], origins[key.dotted], allowed)
    members = len(s.cluster.etcd)
    if members and "cluster.etcd_metrics" not in errors and len(s.cluster.etcd_metrics) > members:
        key = BY_DOTTED["cluster.etcd_metrics"]
        allowed = f"at most one URL per member of cluster.etcd ({members}), in its order"
        errors[key.dotted] = bad_value(key, raw[key.dotted], origins[key.dotted], allowed)


_cache: tuple[Any, Loaded] | None = None


def current() -> Loaded:
    """The settings now: read again whenever a ``KASOU_*`` variable or the file (its path, modification time,
    size) changed since the last read, else the last read's result."""
    global _cache
    env = {k: v for k, v in os.environ.items() if k.startswith("KASOU_")}
    path, named = config_path(env)
    try:
        st = os.stat(path)
        stamp: tuple[Any, ...] = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError as e:
        stamp = ("missing", e.errno)
    key = (tuple(sorted(env.items())), str(path), stamp, host_env_stamp(env))
    cached = _cache
    if cached is not None and cached[0] == key:
        return cached[1]
    loaded = load(env, path, named)
    _cache = (key, loaded)
    return loaded
