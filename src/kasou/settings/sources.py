"""Where settings come from: the ``KASOU_*`` environment and the TOML file, as pydantic-settings sources.

Both give ``{section: {key: raw value}}``: the environment's values as the strings they are (an empty one
counts as unset, so ``KASOU_X=`` in a unit's environment file leaves the file's value), the file's as TOML
typed them. The model (:class:`kasou.settings.model.Settings`) turns them into values.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

from kasou.errors import InvalidSetting

DEFAULT_FILE = Path("/etc/kasou/kasou.toml")
CONFIG_ENV = "KASOU_CONFIG"
MAX_FILE_BYTES = 1024 * 1024
CONFIG_DIR_ENV = "KASOU_CONFIG_DIR"
DEFAULT_CONFIG_DIR = Path("/etc/kasou")
#: The services' environment files, in the order their units read them (``EnvironmentFile=``): what the
#: package ships, then what ``kasou cluster init|join`` wrote. kasou reads them too, under the process's own
#: environment, so that a command on a host (``kasou vm list`` in a root shell) has the settings its services
#: have, without ``set -a; . /etc/kasou/cluster.env``.
HOST_ENV_FILES = ("kasou.env", "cluster.env")


#: ``KASOU_*`` variables that are no setting of this model but are kasou's all the same: the file's name, the
#: CLI's token, the systemd units' command-line options, the backup server's, the lab's, the build's and the
#: tests'. Every other ``KASOU_*`` variable is refused as unknown.
OTHER_VARIABLES: dict[str, str] = {
    "KASOU_CONFIG": "the settings file (default /etc/kasou/kasou.toml)",
    "KASOU_TOKEN": "the API token a client sends (else the token file)",
    "KASOU_SERVE_OPTS": "kasou-api.service's options for kasou serve",
    "KASOU_AGENT_OPTS": "kasou-agent.service's options for kasou agent",
    "KASOU_BACKUP_SERVER_LISTEN": "kasou-backup-server.service's listening address",
    "KASOU_BACKUP_SERVER_DIR": "the backup server's data directory (kasou backup-server --dir)",
    "KASOU_BACKUP_SYNC_TOKEN": "a reader token of a primary backup server (kasou backup-server --token)",
    "KASOU_LAB_DIR": "the directory of kasou lab (default /var/lib/kasou/lab)",
    "KASOU_CONFIG_DIR": "where kasou cluster init|join write the host's settings and the site's secrets (/etc/kasou)",
    "KASOU_SYSTEMD": "kasou cluster init|join: 0 starts the services as processes even where systemd runs",
    "KASOU_GUESTS_TIMEOUT": "kasou-guests.service: seconds for each VM's graceful shutdown",
    "KASOU_START": "the package's postinst: start the services on first install",
    "KASOU_DEB_REVISION": "scripts/build-deb.sh: the Debian revision",
    "KASOU_DEB_PYTHON": "scripts/build-deb.sh: the interpreter",
    "KASOU_EXTRA_PACKAGES": "scripts/install.sh: more Debian packages",
    "KASOU_REQUIRE_ALL": "tests: no real test may skip (CI)",
    "KASOU_TEST_KEEP_LOGS": "tests: keep the services' logs",
    "KASOU_TEST_SHOTS": "tests: where the browser tests save screenshots",
    "KASOU_CHROMIUM": "tests: the browser the browser tests drive",
    # the Debian guest image's scripts, in their own tests
    "KASOU_CONSOLE": "guest image tests",
    "KASOU_DATA": "guest image tests",
    "KASOU_EFI": "guest image tests",
    "KASOU_TPM_DEV": "guest image tests",
    "KASOU_TPM_CLASS": "guest image tests",
    "KASOU_PORTS": "guest image tests",
    "KASOU_DEV": "guest image tests",
}


def nearest(name: str, names: list[str]) -> str:
    """`` (did you mean X?)`` for the closest of ``names``, or nothing."""
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def env_names(settings_cls: type[BaseSettings]) -> dict[str, tuple[str, str]]:
    """Each setting's variable → (section, key), from the model's fields (their ``env``)."""
    out = {}
    for section, sfield in settings_cls.model_fields.items():
        model = sfield.annotation
        for name, f in getattr(model, "model_fields", {}).items():
            extra = f.json_schema_extra
            if isinstance(extra, dict) and isinstance(extra.get("env"), str):
                out[str(extra["env"])] = (section, name)
    return out


def config_path(environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The settings file and whether it was named (``KASOU_CONFIG``): a named file must exist, the default
    /etc/kasou/kasou.toml need not."""
    named = environ.get(CONFIG_ENV, "").strip()
    return (Path(named), True) if named else (DEFAULT_FILE, False)


def config_dir(environ: Mapping[str, str]) -> Path:
    """Where a host's settings files and secrets are: ``KASOU_CONFIG_DIR``, else /etc/kasou."""
    return Path(environ.get(CONFIG_DIR_ENV, "").strip() or DEFAULT_CONFIG_DIR).absolute()


def read_env_file(path: Path, unreadable_ok: bool = True) -> dict[str, str]:
    """The ``NAME=value`` lines of an environment file as systemd reads them (comments, blank lines and
    surrounding quotes left out); nothing when it is absent, or not readable (a user's CLI without root) unless
    ``unreadable_ok`` is false: then that error is raised."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    except OSError:
        if unreadable_ok:
            return {}
        raise
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")) or "=" not in line:
            continue
        name, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def host_env(environ: Mapping[str, str]) -> list[tuple[Path, dict[str, str]]]:
    """The ``KASOU_*`` values of :data:`HOST_ENV_FILES`, each file with its own, in order."""
    directory = config_dir(environ)
    out = []
    for name in HOST_ENV_FILES:
        path = directory / name
        values = {k: v for k, v in read_env_file(path).items() if k.startswith("KASOU_")}
        if values:
            out.append((path, values))
    return out


def host_env_stamp(environ: Mapping[str, str]) -> tuple[Any, ...]:
    """What changes when one of the host's environment files does (for a cache of the settings)."""
    directory = config_dir(environ)
    stamp: list[Any] = []
    for name in HOST_ENV_FILES:
        try:
            st = os.stat(directory / name)
            stamp.append((name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError as e:
            stamp.append((name, e.errno))
    return tuple(stamp)


def env_values(environ: Mapping[str, str], names: Mapping[str, tuple[str, str]]) -> dict[str, dict[str, str]]:
    """The settings in ``environ`` (``names``: :func:`env_names`), by section and key (empty values left out)."""
    out: dict[str, dict[str, str]] = {}
    for name, value in environ.items():
        where = names.get(name)
        if where is not None and value.strip():
            out.setdefault(where[0], {})[where[1]] = value.strip()
    return out


def unknown_env(environ: Mapping[str, str], names: Mapping[str, tuple[str, str]]) -> list[InvalidSetting]:
    """One error for each ``KASOU_*`` variable kasou does not know, with the nearest name it does."""
    known = [*names, *OTHER_VARIABLES]
    return [
        InvalidSetting(f"{name} is no setting of kasou{nearest(name, known)}; see docs/configuration.md", setting=name)
        for name in sorted(environ)
        if name.startswith("KASOU_") and name not in names and name not in OTHER_VARIABLES
    ]


def read_file(path: Path, named: bool) -> dict[str, Any] | None:
    """The file's tables; None when the default file is absent (or not readable: a user's CLI without root).
    A named file that is missing or unreadable, a file that is no TOML: :class:`InvalidSetting`, one line."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        if named:
            raise InvalidSetting(f"{CONFIG_ENV}={str(path)!r}: no such file", setting=CONFIG_ENV) from None
        return None
    except PermissionError:
        if named:
            raise InvalidSetting(f"cannot read the settings file {path}: permission denied (run as root?)") from None
        return None
    except OSError as e:
        raise InvalidSetting(f"cannot read the settings file {path}: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        raise InvalidSetting(f"the settings file {path} is larger than {MAX_FILE_BYTES // 1024} KiB")
    try:
        return tomllib.loads(data.decode())
    except UnicodeDecodeError:
        raise InvalidSetting(f"the settings file {path} is not text (UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise InvalidSetting(f"the settings file {path} is not valid TOML: {e}") from None


class EnvSource(PydanticBaseSettingsSource):
    """The ``KASOU_*`` variables, each under its key's section and name."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str] | None = None) -> None:
        super().__init__(settings_cls)
        self.environ = environ

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, True

    def __call__(self) -> dict[str, Any]:
        environ = os.environ if self.environ is None else self.environ
        return dict(env_values(environ, env_names(self.settings_cls)))


class TomlSource(PydanticBaseSettingsSource):
    """The settings file (``KASOU_CONFIG``, else /etc/kasou/kasou.toml), as it is."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None = None, named: bool = True) -> None:
        super().__init__(settings_cls)
        self.path, self.named = (path, named) if path is not None else config_path(os.environ)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self().get(field_name), field_name, True

    def __call__(self) -> dict[str, Any]:
        return read_file(self.path, self.named) or {}
