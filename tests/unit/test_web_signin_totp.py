"""The sign-in page asks for a TOTP code when the server says one is needed, in Japanese and English."""

from __future__ import annotations

import re
from pathlib import Path

STATIC = Path(__file__).resolve().parents[2] / "src" / "kasou" / "web" / "static"


def test_code_field_hidden_until_asked_for() -> None:
    html = (STATIC / "index.html").read_text()
    field = re.search(r"<input id=\"totp\"[^>]*>", html)
    assert field and " hidden" in field.group(0) and 'autocomplete="one-time-code"' in field.group(0)
    js = (STATIC / "index.js").read_text()
    assert 'why === "required"' in js and "code.hidden = false" in js
    assert "totp" in (STATIC / "api.js").read_text()


def test_code_labels_in_both_languages() -> None:
    text = (STATIC / "i18n.js").read_text()
    ja, en = text.split("\n  en: {", 1)
    for key in ("signin.totp", "signin.totp_needed", "signin.totp_enroll"):
        assert f'"{key}":' in ja and f'"{key}":' in en.split("\n};", 1)[0], key
