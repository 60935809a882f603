"""The settings' reference, made from the model: the tables of docs/configuration.md and the commented example
file (packaging/kasou.toml.example, ``kasou config example``). tests/unit/test_settings_file.py checks that both
files are what these functions make, so neither can drift from the model."""

from __future__ import annotations

import json
import textwrap
from typing import Any

from kasou.settings.model import SECTIONS, Key, show

SECTION_TITLES = {
    "api": "the REST API and its clients",
    "paths": "where kasou keeps its files",
    "tls": "TLS files (docs/security.md)",
    "host": "this host",
    "cluster": "a cluster's store (docs/operations.md)",
    "ha": 'high availability (docs/architecture.md, "Why these numbers")',
    "maintenance": "emptying a host for maintenance",
    "backup": "backups on the host's backup directory",
    "recording": "console recordings (docs/recordings.md)",
    "audit": "the audit log (docs/audit.md)",
    "session": "sign-in, sessions and consoles (docs/security.md)",
    "confine": "QEMU confinement (docs/security.md)",
    "notify": "notifications of events",
}

# A value to show in the example file for keys without one by default.
EXAMPLES: dict[str, Any] = {
    "api.trusted_proxies": ["10.0.0.5", "10.1.0.0/16"],
    "api.token_file": "/etc/kasou/api.token",
    "api.secrets_key": "/etc/kasou/secrets.key",
    "paths.transfer_dir": "/var/lib/kasou/transfer",
    "paths.shared_dir": "/srv/kasou-shared",
    "tls.dir": "/var/lib/kasou/tls",
    "tls.ca": "/etc/ssl/hospital/ca.crt",
    "tls.cert": "/etc/ssl/hospital/kasou1.crt",
    "tls.key": "/etc/ssl/hospital/kasou1.key",
    "host.name": "kasou1",
    "host.uplink": "eth1",
    "cluster.etcd": ["https://10.0.0.11:2379", "https://10.0.0.12:2379", "https://10.0.0.13:2379"],
    "cluster.etcd_metrics": ["https://10.0.0.11:2381", "https://10.0.0.12:2381", "https://10.0.0.13:2381"],
    "ha.watchdog": "/dev/watchdog",
    "backup.dir": "/mnt/kasou-backups",
    "backup.keep": 7,
    "recording.dir": "/var/lib/kasou/recordings",
    "audit.syslog": "/dev/log",
    "audit.key": "/var/lib/kasou/audit.key",
    "audit.anchor": "/mnt/audit-anchor/audit-anchors.jsonl",
    "session.require_totp_for": ["admin", "operator", "vendor"],
    "session.require_totp_for_admins": True,
    "session.break_glass_file": "/var/lib/kasou/break-glass.json",
    "notify.webhook": "https://alerts.hospital.example/kasou",
    "notify.webhook_secret": "a long random text, also known to the receiver",
    "notify.smtp_host": "mail.hospital.example",
    "notify.mail_from": "kasou@hospital.example",
    "notify.mail_to": ["it-oncall@hospital.example", "infra@hospital.example"],
    "notify.syslog": "udp://10.0.0.9:514",
    "notify.smtp_user": "kasou",
    "notify.smtp_password": "the relay's password",
    "notify.route": [{"department": "lab", "mail_to": ["lab-it@hospital.example"], "min_severity": "error"}],
}


def toml_value(value: Any) -> str:
    """A value as TOML writes it (strings, numbers, booleans, lists, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) and not value.is_integer() else str(int(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)


def _default_cell(key: Key) -> str:
    if key.shown is not None:
        return key.shown
    return f"`{show(key.default)}`" if key.default not in (None, []) else "none"


def markdown_tables() -> str:
    """One table per section: key, environment variable, type, default, allowed values, meaning."""
    out: list[str] = []
    for section, keys in SECTIONS.items():
        out.append(f"### `[{section}]`: {SECTION_TITLES[section]}\n")
        out.append("| key | environment | type | default | allowed | meaning |")
        out.append("|---|---|---|---|---|---|")
        for k in keys:
            secret = " (a secret: masked by `kasou config show`)" if k.secret else ""
            cells = [f"`{k.name}`", f"`{k.env}`", k.kind, _default_cell(k), k.allowed, k.doc + secret]
            out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def example_file() -> str:
    """The commented example: every key with its default (or an example value) and its variable."""
    out = [
        "# kasou's settings on this host (TOML). Every key is listed with its default, commented out:",
        "# uncomment a line to change it. A KASOU_* variable in the environment (its name is given for",
        "# each key; /etc/kasou/kasou.env for the services) wins over this file. Check a change with",
        "#   kasou config check           and see what is in effect with   kasou config show",
        "# then restart the services (running VMs are not stopped): systemctl restart kasou-agent kasou-api",
        "# Every key, its type and what it allows: /usr/share/doc/kasou/docs/configuration.md",
    ]
    for section, keys in SECTIONS.items():
        out += ["", f"# -- {SECTION_TITLES[section]} --", f"[{section}]"]
        for i, k in enumerate(keys):
            out += [""] if i else []
            out += textwrap.wrap(f"{k.doc}. {k.env}: {k.allowed}.", 100, initial_indent="# ", subsequent_indent="# ")
            if k.default not in (None, []):
                out.append(f"#{k.name} = {toml_value(k.default)}")
            else:
                out.append(f"# (default: {k.default_text()})")
                out.append(f"#{k.name} = {toml_value(EXAMPLES[k.dotted])}")
    return "\n".join(out) + "\n"
