"""What a host that is not the leader passes back of the leader's answer to a change it forwarded."""

from __future__ import annotations


def test_a_forwarded_change_passes_back_the_session_cookie_and_the_wait() -> None:
    """A sign-in sent to a host that is not the leader is forwarded there: its session cookie (and a rate limit's
    Retry-After, a download's name, kasou's own headers) must reach the browser; the leader's length, encoding and
    security headers are the forwarding server's own business."""
    from kasou.api.app import passed_back

    leader = [("content-type", "application/json"), ("content-length", "120"), ("content-encoding", "gzip"),
              ("set-cookie", "kasou_session=abc; HttpOnly; Path=/; SameSite=strict; Secure"),
              ("set-cookie", "other=1; Path=/"), ("retry-after", "30"), ("x-kasou-duration-us", "5"),
              ("content-security-policy", "default-src 'self'"), ("content-disposition", "attachment; filename=a")]  # fmt: skip
    assert passed_back(leader) == [leader[3], leader[4], leader[5], leader[6], leader[8]]
