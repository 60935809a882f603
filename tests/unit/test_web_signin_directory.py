"""The sign-in page says when the hospital directory cannot be reached (from the public status route, which tells
nothing of any user), in Japanese and English."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "src" / "kasou" / "web" / "static"


def test_the_notice_is_hidden_until_the_status_says_unreachable() -> None:
    html = (STATIC / "index.html").read_text()
    notice = re.search(r"<p class=\"notice\" id=\"signin-directory\"[^>]*>", html)
    assert notice and " hidden" in notice.group(0) and 'data-i18n="signin.directory_down"' in notice.group(0)
    js = (STATIC / "index.js").read_text()
    assert '"/v1/directory/status"' in js and 's.directory === "unreachable"' in js


def test_the_notice_in_both_languages() -> None:
    text = (STATIC / "i18n.js").read_text()
    ja, en = text.split("\n  en: {", 1)
    assert '"signin.directory_down":' in ja and '"signin.directory_down":' in en.split("\n};", 1)[0]
