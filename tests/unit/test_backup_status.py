"""The state of a VM's backups in ``kasou backup status`` (kasou.control.backup_status.judge)."""

from __future__ import annotations

from kasou.control.backup_status import DAY_S, judge

NOW = 1_800_000_000.0


def test_states() -> None:
    assert judge(None, None, False, False, 3600, NOW)[0] == "never"
    assert judge("02:00", NOW - 3600, True, True, 3600, NOW) == ("ok", "")
    state, why = judge("02:00", NOW - DAY_S - 7200, True, True, 3600, NOW)
    assert state == "late" and "26 h old" in why and "02:00" in why
    assert judge("02:00", NOW - DAY_S - 1800, True, True, 3600, NOW)[0] == "ok"  # within the grace
    assert judge(None, NOW - 10 * DAY_S, False, False, 3600, NOW)[0] == "ok"  # no schedule: age is not late
    state, why = judge("02:00", NOW - 60, False, True, 3600, NOW)
    assert state == "not_copied" and "backup server" in why


def test_the_server_state_of_the_newest_copy_against_the_policy() -> None:
    from kasou.control.backup_status import judge_copy

    copy = {"generation": 4, "received": NOW, "locked_until": NOW + 30 * DAY_S, "damaged": []}
    assert judge_copy(None, 60, "emr") is None and judge_copy(copy, None, "emr") is None
    assert judge_copy(copy, 30, "emr") is None
    state, why = judge_copy(copy, 60, "emr")  # type: ignore[misc]
    assert state == "lock_short" and "locked 30 days" in why and "--lock-days 60" in why
    state, why = judge_copy({**copy, "damaged": ["ab" * 32]}, 30, "emr")  # type: ignore[misc]
    assert state == "damaged" and "1 damaged chunk" in why
