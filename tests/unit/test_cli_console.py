"""How ``kasou vm log --follow`` finds what is new at the end of the console log."""

from __future__ import annotations

from kasou.cli.console import ANCHOR, new_part


def test_new_output_after_what_was_shown() -> None:
    assert new_part("", "boot\n") == "boot\n"
    assert new_part("boot\n", "boot\nseq 1\n") == "seq 1\n"
    assert new_part("boot\n", "boot\n") == ""


def test_a_sliding_window_is_followed_by_its_last_characters() -> None:
    shown = "x" * 10 + "".join(f"line {i}\n" for i in range(100))
    cur = shown[500:] + "line 100\n"
    assert new_part(shown, cur) == "line 100\n"
    assert len(shown) > ANCHOR


def test_a_log_begun_again_is_shown_whole() -> None:
    assert new_part("old run\n" * 50, "new run\n") == "new run\n"
