"""The settings file and the one typed model: every key refused in one line with a bad value from the
environment and from the file, precedence environment > file > defaults, unknown names, ``kasou config``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from kasou import config, settings
from kasou.cli.main import app
from kasou.errors import InvalidSetting
from kasou.settings import reference

REPO = Path(__file__).resolve().parents[2]

# key → (a bad value in the environment, a bad value in the file)
BAD: dict[str, tuple[str, Any]] = {
    "api.listen": ("127.0.0.1:http", "127.0.0.1:99999"),
    "api.trusted_proxies": ("10.0.0.5,proxy", ["10.0.0.5", "proxy"]),
    "api.token_file": ("relative/api.token", "api.token"),
    "api.secrets_key": ("secrets.key", 7),
    "paths.home": ("var/lib/kasou", ""),
    "paths.images": ("images", 5),
    "paths.transfer_dir": ("transfer", "transfer"),
    "paths.shared_dir": ("shared", "shared"),
    "paths.ovmf_dir": ("OVMF", "OVMF"),
    "paths.novnc_dir": ("novnc", "novnc"),
    "tls.dir": ("tls", "tls"),
    "tls.ca": ("ca.crt", "ca.crt"),
    "tls.cert": ("host.crt", "host.crt"),
    "tls.key": ("host.key", "host.key"),
    "host.name": ("kasou_1!", "kasou 1"),
    "host.uplink": ("a-very-long-interface-name", "eth 1"),
    "host.accel": ("kvmm", "fast"),
    "host.vcpu_ratio": ("four", 0),
    "host.storage_roots": ("srv:relative", ["srv"]),
    "cluster.etcd": ("etcd1:2379", ["etcd1:2379"]),
    "cluster.etcd_metrics": ("metrics:2381", ["metrics"]),
    "ha.lease_ttl": ("six", 1),
    "ha.fence_margin": ("abc", 200),
    "ha.heartbeat_timeout": ("-1", 4),
    "ha.watchdog": ("watchdog", "dev/watchdog"),
    "ha.vendor_max_priority": ("101", "high"),
    "maintenance.attempts": ("0", 21),
    "maintenance.retry_s": ("forever", -1),
    "maintenance.backoff_s": ("-1", 601),
    "backup.dir": ("backups", "backups"),
    "backup.keep": ("7.5", 0),
    "recording.dir": ("recordings", "recordings"),
    "recording.days": ("0", 4000),
    "audit.syslog": ("loghost", "loghost:syslog"),
    "audit.key": ("audit.key", "audit.key"),
    "audit.anchor": ("anchors.jsonl", "anchors.jsonl"),
    "audit.checkpoint_minutes": ("x", -1),
    "audit.checkpoint_every": ("0", 0),
    "session.idle": ("15min", -5),
    "session.max": ("-5", "long"),
    "session.console_idle": ("soon", -1),
    "session.signin_rate": ("lots", -1),
    "session.require_totp_for": ("admin,nurse", ["nurse"]),
    "session.require_totp_for_admins": ("maybe", "maybe"),
    "session.directory_recheck": ("1", "often"),
    "session.break_glass_file": ("break-glass.json", "break-glass.json"),
    "confine.enabled": ("maybe", "perhaps"),
    "confine.uid_base": ("10", 10),
    "confine.uid_count": ("0", 70000),
    "confine.memory_overhead_mib": ("lots", 32),
    "notify.webhook": ("ftp://hooks.example", "hooks.example/kasou"),
    "notify.webhook_secret": ("short", "short"),
    "notify.smtp_host": ("mail host", "mail_host!"),
    "notify.smtp_port": ("0", 70000),
    "notify.mail_from": ("nobody", "nobody"),
    "notify.mail_to": ("a@h.example,nobody", ["nobody"]),
    "notify.syslog": ("loghost", "loghost:syslog"),
    "notify.min_severity": ("loud", "debug"),
    "notify.webhook_attempts": ("0", 21),
    "notify.webhook_backoff": ("-1", "soon"),
    "notify.smtp_starttls": ("maybe", "yes please"),
    "notify.smtp_user": ("x" * 256, "a\nb"),
    "notify.smtp_password": ("p" * 256, "a\x00b"),
    "notify.route": ('[{"department": "lab", "pager": "x"}]', [{"mail_to": ["a@h.example"]}]),
}
CASES = [(k, src) for k in BAD for src in ("env", "file")]


@pytest.fixture
def clean(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No KASOU_* variable; a settings file of this test's own (empty); the home in the test's directory."""
    for name in list(os.environ):
        if name.startswith("KASOU_"):
            monkeypatch.delenv(name)
    file = tmp_path / "kasou.toml"
    file.write_text("")
    monkeypatch.setenv("KASOU_CONFIG", str(file))
    monkeypatch.setenv("KASOU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KASOU_CONFIG_DIR", str(tmp_path / "etc"))  # no environment files (this host's /etc/kasou)
    return file


def toml_line(name: str, value: Any) -> str:
    return f"{name} = {reference.toml_value(value) if not isinstance(value, str) else json.dumps(value)}\n"


def put(file: Path, dotted: str, value: Any) -> None:
    section, name = dotted.split(".")
    file.write_text(file.read_text() + f"[{section}]\n" + toml_line(name, value))


def set_bad(monkeypatch: pytest.MonkeyPatch, file: Path, dotted: str, source: str) -> tuple[str, str]:
    """Set ``dotted`` to its bad value; (the name an error must give, the value as it must show it)."""
    key = settings.BY_DOTTED[dotted]
    env_value, file_value = BAD[dotted]
    if source == "env":
        monkeypatch.setenv(key.env, env_value)
        return key.env, env_value
    monkeypatch.delenv(key.env, raising=False)  # KASOU_HOME: the fixture's
    put(file, dotted, file_value)
    return dotted, repr(file_value)


def test_every_key_has_a_bad_value() -> None:
    assert set(BAD) == set(settings.BY_DOTTED)
    assert len(settings.KEYS) == len(settings.BY_ENV)  # one variable per key


def test_defaults_from_nothing(clean: Path) -> None:
    loaded = settings.current()
    assert loaded.problems() == [] and loaded.file_state == "read"
    assert all(loaded.origin(k.dotted).source == "default" for k in settings.KEYS if k.env != "KASOU_HOME")
    assert config.ha_times() == config.HaTimes() and config.accel_setting() == "auto"
    assert config.notify_settings().min_severity == "warning" and config.notify_settings().mail_to == []


@pytest.mark.parametrize(("dotted", "source"), CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_a_bad_value_is_one_line_in_config_check_and_at_start(
    clean: Path, monkeypatch: pytest.MonkeyPatch, dotted: str, source: str
) -> None:
    name, shown = set_bad(monkeypatch, clean, dotted, source)
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 1, r.output
    assert ("Traceback" not in r.output and r.exception is None) or isinstance(r.exception, SystemExit)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1, r.output
    line = lines[0]
    key = settings.BY_DOTTED[dotted]
    assert line.startswith(f"error: {name}="), line
    assert "is not allowed: " in line and key.allowed in line, line
    if key.kind == "secret":
        raw = str(BAD[dotted][0 if source == "env" else 1])
        assert raw not in line and f"<hidden, {len(raw)} characters>" in line
    else:
        assert shown in line, line
    if source == "file":
        assert str(clean) in line
    # the services' start-up check (kasou up, serve, agent) refuses with that same line
    with pytest.raises(InvalidSetting) as e:
        config.check_settings()
    assert f"error: {e.value.message}" == line
    # and the key's reader says it too, where the key is read
    with pytest.raises(InvalidSetting) as e2:
        config.setting(dotted)
    assert e2.value.message == e.value.message


@pytest.mark.parametrize(
    ("dotted", "source", "command"),
    [
        ("ha.lease_ttl", "file", ["config", "check"]),
        ("host.accel", "env", ["config", "check"]),
        ("notify.smtp_port", "file", ["config", "show"]),
        ("session.require_totp_for", "file", ["up"]),
        ("confine.uid_base", "env", ["up"]),
    ],
)
def test_in_a_process_of_its_own(
    clean: Path, monkeypatch: pytest.MonkeyPatch, dotted: str, source: str, command: list[str]
) -> None:
    """As the installed ``kasou`` runs: exit 1, one line on stderr, no traceback, nothing started."""
    name, shown = set_bad(monkeypatch, clean, dotted, source)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, "-m", "kasou", *command], env=env, capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {name}=") and shown in lines[0], r.stderr
    assert not (clean.parent / "home").exists()  # kasou up started nothing


def test_precedence_environment_then_file_then_default(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean.write_text('[ha]\nlease_ttl = 12\nfence_margin = 3\n[api]\nlisten = "127.0.0.1:9000"\n')
    monkeypatch.setenv("KASOU_HA_LEASE_TTL", "20")
    monkeypatch.setenv("KASOU_HA_HEARTBEAT_TIMEOUT", "")  # empty: unset, the file or default holds
    assert config.ha_times() == config.HaTimes(20.0, 3.0, 30.0)
    assert config.api_url() == "http://127.0.0.1:9000"
    r = CliRunner().invoke(app, ["config", "show", "--json"])
    assert r.exit_code == 0, r.output
    rows = {row["key"]: row for row in json.loads(r.stdout)["settings"]}
    assert rows["ha.lease_ttl"] == {**rows["ha.lease_ttl"], "value": 20.0, "source": "environment",
                                    "from": "KASOU_HA_LEASE_TTL"}  # fmt: skip
    assert rows["ha.fence_margin"]["source"] == "file" and rows["ha.fence_margin"]["from"] == str(clean)
    assert rows["ha.heartbeat_timeout"]["source"] == "default" and rows["ha.heartbeat_timeout"]["value"] == 30.0
    assert rows["backup.dir"]["value"] == str(clean.parent / "home" / "backups")  # a derived default, shown
    text = CliRunner().invoke(app, ["config", "show"]).stdout
    assert re.search(r"ha\.lease_ttl\s+20\s+\[environment KASOU_HA_LEASE_TTL\]", text), text
    assert re.search(rf"ha\.fence_margin\s+3\s+\[file {re.escape(str(clean))}\]", text), text
    assert CliRunner().invoke(app, ["config", "show", "-o", "json"]).stdout == r.stdout


def test_the_services_environment_files_are_read_under_the_process_environment(
    clean: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a host set up by the package and kasou cluster init, a root shell's kasou has its services' settings:
    kasou.env, then cluster.env (as the units read them), under the process's own environment."""
    etc = clean.parent / "etc"
    etc.mkdir()
    clean.write_text('[api]\nlisten = "127.0.0.1:9000"\n[ha]\nlease_ttl = 12\n')
    (etc / "kasou.env").write_text("# comments\n#KASOU_API=127.0.0.1:8470\nKASOU_SERVE_OPTS=--plain-http\n"
                                   "KASOU_HA_LEASE_TTL=14\nKASOU_SESSION_IDLE=600\nPATH=/nothing\n")  # fmt: skip
    (etc / "cluster.env").write_text('KASOU_API="https://10.0.0.11:8470"\nKASOU_HA_LEASE_TTL=16\n')
    assert config.api_url() == "https://10.0.0.11:8470" and config.ha_times().lease_ttl_s == 16
    assert config.session_idle_s() == 600 and os.environ.get("PATH") != "/nothing"
    monkeypatch.setenv("KASOU_HA_LEASE_TTL", "18")  # the process's own environment wins
    assert config.ha_times().lease_ttl_s == 18
    rows = {row["key"]: row for row in json.loads(CliRunner().invoke(app, ["config", "show", "-o", "json"]).stdout)
            ["settings"]}  # fmt: skip
    assert rows["api.listen"]["from"] == f"KASOU_API in {etc / 'cluster.env'}"
    assert rows["session.idle"]["from"] == f"KASOU_SESSION_IDLE in {etc / 'kasou.env'}"
    assert rows["ha.lease_ttl"]["from"] == "KASOU_HA_LEASE_TTL"
    # a bad value names its file; an unknown name in a file too
    (etc / "cluster.env").write_text("KASOU_API=10.0.0.11:http\nKASOU_HA_LEASE_TTI=16\n")
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code != 0
    assert f"KASOU_API='10.0.0.11:http' in {etc / 'cluster.env'} is not allowed" in r.output, r.output
    assert "KASOU_HA_LEASE_TTI is no setting of kasou (did you mean KASOU_HA_LEASE_TTL?)" in r.output, r.output


def test_no_stale_reading(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.session_idle_s() == 900
    monkeypatch.setenv("KASOU_SESSION_IDLE", "60")
    assert config.session_idle_s() == 60
    monkeypatch.delenv("KASOU_SESSION_IDLE")
    clean.write_text("[session]\nidle = 120\n")
    os.utime(clean, ns=(1, 1))
    assert config.session_idle_s() == 120
    clean.write_text("[session]\nidle = 180\n")
    os.utime(clean, ns=(2, 2))
    assert config.session_idle_s() == 180
    other = clean.parent / "other.toml"
    other.write_text("[session]\nidle = 240\n")
    monkeypatch.setenv("KASOU_CONFIG", str(other))
    assert config.session_idle_s() == 240


def test_a_bad_key_stops_only_its_readers(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_VCPU_RATIO", "four")
    assert config.session_idle_s() == 900 and config.api_url() == "http://127.0.0.1:8470"
    with pytest.raises(InvalidSetting, match="KASOU_VCPU_RATIO='four'"):
        config.vcpu_ratio_setting()


def test_unknown_names_are_refused_with_the_nearest(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_HA_LEASE_TT", "6")
    clean.write_text("lease_ttl = 6\n[ha]\nfence_margn = 1\n[sesion]\nidle = 5\n")
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 1
    assert r.output.splitlines() == [
        f"error: {clean}: lease_ttl is no section or setting of kasou (did you mean ha.lease_ttl?)",
        f"error: {clean}: [ha] fence_margn is no setting of kasou (did you mean ha.fence_margin?)",
        f"error: {clean}: sesion is no section or setting of kasou (did you mean session?)",
        "error: KASOU_HA_LEASE_TT is no setting of kasou (did you mean KASOU_HA_LEASE_TTL?); see docs/configuration.md",
    ]
    with pytest.raises(InvalidSetting, match="lease_ttl is no section"):
        config.check_settings()
    assert config.ha_times() == config.HaTimes()  # the known keys are still read


def test_kasou_own_other_variables_are_not_unknown(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KASOU_TOKEN", "KASOU_SERVE_OPTS", "KASOU_AGENT_OPTS", "KASOU_REQUIRE_ALL", "KASOU_LAB_DIR"):
        monkeypatch.setenv(name, "x")
    config.check_settings()


def test_the_file_named_must_exist_the_default_need_not(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = clean.parent / "missing.toml"
    monkeypatch.setenv("KASOU_CONFIG", str(missing))
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 1 and r.output == f"error: KASOU_CONFIG='{missing}': no such file\n"
    with pytest.raises(InvalidSetting, match="no such file"):
        config.ha_times()
    monkeypatch.delenv("KASOU_CONFIG")
    monkeypatch.setattr(settings.sources, "DEFAULT_FILE", missing)
    config.check_settings()
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 0 and f"{missing} (absent)" in r.output


def test_a_file_that_is_no_toml_is_one_line(clean: Path) -> None:
    clean.write_text("[ha\nlease_ttl = 6\n")
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 1 and len(r.output.splitlines()) == 1
    assert r.output.startswith(f"error: the settings file {clean} is not valid TOML: ")


def test_check_a_file_before_it_is_installed(clean: Path, tmp_path: Path) -> None:
    new = tmp_path / "new.toml"
    new.write_text("[host]\nvcpu_ratio = 8\n")
    r = CliRunner().invoke(app, ["config", "check", "--file", str(new)])
    assert r.exit_code == 0 and "1 from the file" in r.output, r.output
    new.write_text("[host]\nvcpu_ratio = 80\n")
    r = CliRunner().invoke(app, ["config", "check", "--file", str(new)])
    assert r.exit_code == 1 and f"host.vcpu_ratio=80 in {new} is not allowed" in r.output


def test_secrets_are_masked(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean.write_text('[notify]\nwebhook = "https://hooks.example/T00/s3cr3tpath"\n')
    monkeypatch.setenv("KASOU_NOTIFY_WEBHOOK_SECRET", "correct horse battery staple")
    for args in (["config", "show"], ["config", "show", "--json"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 0 and "s3cr3tpath" not in r.output and "battery" not in r.output
        assert "https://hooks.example/********" in r.output
    assert config.notify_settings().webhook_secret == "correct horse battery staple"


def test_notify_settings(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean.write_text('[notify]\nsmtp_host = "mail.h.example"\nmail_to = ["a@h.example"]\nmin_severity = "error"\n')
    monkeypatch.setenv("KASOU_NOTIFY_MAIL_TO", "b@h.example, c@h.example")
    monkeypatch.setenv("KASOU_NOTIFY_SMTP_PORT", "587")
    n = config.notify_settings()
    assert (n.smtp_host, n.smtp_port, n.mail_to, n.min_severity) == (
        "mail.h.example", 587, ["b@h.example", "c@h.example"], "error")  # fmt: skip
    with pytest.raises(ValueError):
        n.smtp_port = 25  # type: ignore[misc]  # frozen


def test_pydantic_settings_reads_the_same_sources(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean.write_text("[ha]\nlease_ttl = 12\n[host]\nvcpu_ratio = 2\n")
    monkeypatch.setenv("KASOU_VCPU_RATIO", "3")
    s = settings.Settings()
    assert (s.ha.lease_ttl, s.host.vcpu_ratio) == (12.0, 3.0)


def test_the_reference_files_are_current() -> None:
    doc = (REPO / "docs/configuration.md").read_text()
    start, end = "<!-- generated: kasou.settings.reference.markdown_tables -->\n\n", "<!-- end of the generated tables"
    assert doc.split(start, 1)[1].split(end, 1)[0] == reference.markdown_tables(), "make them again: see the test"
    example = (REPO / "packaging/kasou.toml.example").read_text()
    assert example == reference.example_file(), "kasou config example > packaging/kasou.toml.example"
    uncommented = re.sub(r"(?m)^#(\w+ = )", r"\1", example)
    data = tomllib.loads(uncommented)
    assert {f"{s}.{k}" for s, t in data.items() for k in t} == set(settings.BY_DOTTED)
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"kasou-example-{os.getpid()}.toml"
    try:
        path.write_text(uncommented)
        assert settings.load({}, path, True).problems() == []
    finally:
        path.unlink()
    r = CliRunner().invoke(app, ["config", "example"])
    assert r.exit_code == 0 and r.stdout == example


def test_the_fence_margin_is_at_most_half_the_lease(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clean.write_text("[ha]\nlease_ttl = 6\nfence_margin = 4\n")
    with pytest.raises(InvalidSetting) as e:
        config.check_settings()
    assert e.value.message == (f"ha.fence_margin=4 in {clean} is not allowed: a number from 0.5 to 3 "
                               "(half of ha.lease_ttl) (default 2)")  # fmt: skip
    monkeypatch.setenv("KASOU_HA_LEASE_TTL", "10")  # the environment's lease makes the file's margin right
    assert config.ha_times() == config.HaTimes(10.0, 4.0, 30.0)


def test_etcd_metrics_at_most_one_per_member(clean: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KASOU_ETCD", "http://a:2379")
    monkeypatch.setenv("KASOU_ETCD_METRICS", "http://a:2381,http://b:2381")
    r = CliRunner().invoke(app, ["config", "check"])
    assert r.exit_code == 1 and r.output == (
        "error: KASOU_ETCD_METRICS='http://a:2381,http://b:2381' is not allowed: at most one URL per member of "
        "cluster.etcd (1), in its order (default none)\n"
    )
