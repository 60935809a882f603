"""Every label the dashboard asks for exists in Japanese and in English (a missing one would show its key)."""

from __future__ import annotations

import re
from pathlib import Path

from kasou.control.records import JobState
from kasou.model.state import VMState

STATIC = Path(__file__).resolve().parents[2] / "src" / "kasou" / "web" / "static"
SHARED = ("app.title", "signin.title", "signout", "lang.switch")


def labels(*files: str) -> dict[str, set[str]]:
    """The label keys each language has in these files (default: the dashboard's and the shared ones)."""
    text = "".join((STATIC / f).read_text() for f in files or ("dashboard-labels.js", "i18n.js"))
    out: dict[str, set[str]] = {"ja": set(), "en": set()}
    for block in re.split(r"\n\s*(?=(?:ja|en): \{)", text):
        lang = block.strip()[:2]
        if lang in out:
            out[lang] |= set(re.findall(r'"([a-z_]+(?:\.[a-z_0-9]+)*)":', block))
    return out


def used_keys() -> set[str]:
    keys: set[str] = set()
    for name in ("dashboard.js", "jobs-live.js"):
        src = (STATIC / name).read_text()
        keys |= set(re.findall(r'\bt\("([a-z_]+\.[a-z_.]+|[a-z]+)"', src))
        keys |= set(re.findall(r'data-i18n="([a-z_.]+)"', src))
        keys |= set(re.findall(r'\["(col\.[a-z_]+)"', src)) | set(re.findall(r'"(col\.[a-z_]+)"', src))
    return keys


def test_every_used_label_exists_in_both_languages() -> None:
    have = labels()
    used = used_keys()
    assert len(used) > 40
    for lang in ("ja", "en"):
        missing = sorted(k for k in used if k not in have[lang])
        assert not missing, (lang, missing)
        assert all(k in have[lang] for k in SHARED)


def test_every_state_shown_has_words() -> None:
    have = labels()
    states = {s.value for s in VMState} | {s.value for s in JobState}
    states |= {"up", "down", "maintenance", "ok", "low", "full", "missing", "in_sync", "syncing", "degraded"}
    states |= {"info", "warning", "error", "critical"}
    for lang in ("ja", "en"):
        missing = sorted(s for s in states if f"state.{s}" not in have[lang])
        assert not missing, (lang, missing)
    for lang in ("ja", "en"):
        roles = {f"role.{r}" for r in ("admin", "operator", "clinician", "auditor")}
        actions = {f"act.{a}" for a in ("start", "shutdown", "stop", "migrate", "maint_on", "maint_off")}
        assert roles | actions <= have[lang], (lang, sorted((roles | actions) - have[lang]))
    assert have["ja"] == have["en"], sorted(have["ja"] ^ have["en"])


def test_the_account_page_has_words_in_both_languages() -> None:
    have = labels("account.js", "i18n.js")
    used = set(re.findall(r'data-i18n="([a-z_.]+)"', (STATIC / "account.html").read_text()))
    used |= set(re.findall(r'\bt\("([a-z_.]+)"', (STATIC / "account.js").read_text()))
    used |= set(re.findall(r'"(account\.totp_o(?:n|ff))"', (STATIC / "account.js").read_text()))
    assert len(used) > 15
    for lang in ("ja", "en"):
        assert not sorted(used - have[lang]), (lang, sorted(used - have[lang]))


def test_the_balancer_and_notification_cards_have_words_in_both_languages() -> None:
    have = labels("ops-labels.js", "dashboard-labels.js")
    src = (STATIC / "ops.js").read_text()
    used = set(re.findall(r'\bt\("([a-z_]+\.[a-z_.]+)"', src)) | set(re.findall(r'"((?:ntf|bal|col)\.[a-z_]+)"', src))
    # the labels built from values: modes, resources, channel kinds, severities, test outcomes
    used |= {f"bal.mode.{m}" for m in ("off", "recommend", "automatic")} | {"bal.res.cpu", "bal.res.memory"}
    used |= {f"ntf.kind.{k}" for k in ("mail", "webhook", "syslog")}
    used |= {f"ntf.severity.{s}" for s in ("info", "warning", "error", "critical")}
    used |= {f"ntf.outcome.{o}" for o in ("delivered", "failed", "skipped")}
    assert len(used) > 40
    for lang in ("ja", "en"):
        assert not sorted(used - have[lang]), (lang, sorted(used - have[lang]))
    ops = labels("ops-labels.js")
    assert ops["ja"] == ops["en"], sorted(ops["ja"] ^ ops["en"])
