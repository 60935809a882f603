"""One directory contract, three directories: the fake (tests/doubles/directory.py), Samba AD and OpenLDAP.

Each test runs against every directory that can show it (slapd knows no disabled account nor a password that
must change; the fake has no TLS). The real ones are marked ``directory`` and run once per run
(tests/conftest.py: ``samba_dc``, ``slapd_server``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from kasou.control.ldapclient import AccountRefused, DirectoryServer, LdapDirectory, Settings
from kasou.errors import DirectoryUnavailable, Unauthorized
from tests.doubles.directory import FakeTree
from tests.ldapservers import PASSWORD, PEOPLE, DirectoryCA

ALL = ["fake", "slapd", "samba"]
TLS = ["slapd", "samba"]
AD_LIKE = ["fake", "samba"]  # refuses a disabled account, a password that must change


@dataclass
class Dir:
    kind: str
    settings: Settings
    make: Callable[[Settings], DirectoryServer]
    dead_url: str  # an address where nothing listens
    starttls_url: str = ""
    other_url: str = ""  # the server at an address its certificate does not name

    def client(self, **kw: object) -> DirectoryServer:
        s = self.settings
        if kw:
            s = Settings(**{**s.__dict__, **kw})
        return self.make(s)


REAL = [pytest.mark.directory, pytest.mark.shares_machine]  # the real servers (beside the fast tests)


def _params(kinds: list[str]) -> list[object]:
    return [pytest.param(k, marks=REAL if k != "fake" else []) for k in kinds]


@pytest.fixture
def d(request: pytest.FixtureRequest) -> Dir:
    kind = request.param
    if kind == "fake":
        tree = FakeTree()
        for u, gs in PEOPLE.items():
            tree.add_user(u, PASSWORD, *gs, disabled=u == "carol", state="must_change" if u == "dave" else "")
        tree.add_member("kasou-vendors-lab", tree.group_dn("lab-staff"))
        return Dir("fake", tree.settings(), tree.client, "ldaps://nowhere.kasou.test")
    server = request.getfixturevalue("samba_dc" if kind == "samba" else "slapd_server")
    return Dir(
        kind,
        server.settings(),
        LdapDirectory,
        f"ldaps://{server.ns.host_ip}:1",
        server.starttls_url,
        f"ldaps://{server.ns.other_ip}",
    )


def contract(kinds: list[str]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("d", _params(kinds), indirect=True)


@contract(ALL)
def test_a_user_is_found_and_binds_with_the_password(d: Dir) -> None:
    c = d.client()
    e = c.find_user("alice")
    assert e is not None and "alice" in e.dn.lower() and not e.disabled
    assert e.display_name
    c.check_password(e.dn, PASSWORD)
    assert c.answered == d.settings.urls[0]


@contract(ALL)
def test_a_wrong_or_empty_password_is_one_answer(d: Dir) -> None:
    c = d.client()
    e = c.find_user("alice")
    assert e is not None
    for pw in ("not-the-password", ""):
        with pytest.raises(Unauthorized) as err:
            c.check_password(e.dn, pw)
        assert err.value.message == "wrong user name or password" and not isinstance(err.value, AccountRefused)


@contract(ALL)
def test_unknown_names_and_filter_characters_find_no_one(d: Dir) -> None:
    c = d.client()
    for name in ("nobody", "*", "alice)(uid=*", "a*", "alice\\"):
        assert c.find_user(name) is None, name
    assert c.find_user("ALICE") is not None  # names are without case, as in AD


@contract(ALL)
def test_groups_include_nested_ones(d: Dir) -> None:
    c = d.client()
    e = c.find_user("bob")
    assert e is not None
    names = {g.name for g in c.groups(e.dn)}
    assert names == {"lab-staff", "kasou-vendors-lab"}
    alice = c.find_user("alice")
    assert alice is not None and {g.name for g in c.groups(alice.dn)} == {"kasou-ops"}


@contract(AD_LIKE)
def test_a_disabled_account_is_refused_only_with_the_right_password(d: Dir) -> None:
    c = d.client()
    e = c.find_user("carol")
    assert e is not None
    with pytest.raises(Unauthorized) as wrong:
        c.check_password(e.dn, "not-the-password")
    assert not isinstance(wrong.value, AccountRefused)  # a wrong password says nothing of the account
    with pytest.raises(AccountRefused, match="disabled"):
        c.check_password(e.dn, PASSWORD)


@contract(AD_LIKE)
def test_a_password_that_must_change_is_refused_with_the_way_out(d: Dir) -> None:
    c = d.client()
    e = c.find_user("dave")
    assert e is not None
    with pytest.raises(AccountRefused, match="must be changed"):
        c.check_password(e.dn, PASSWORD)


@contract(ALL)
def test_an_unreachable_directory_is_one_line_within_the_timeout(d: Dir) -> None:
    c = d.client(urls=(d.dead_url,), timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(DirectoryUnavailable, match="cannot be reached"):
        c.ping()
    assert time.monotonic() - t0 < 5
    with pytest.raises(DirectoryUnavailable):
        c.find_user("alice")


@contract(TLS)  # (the fake has one address)
def test_the_next_url_is_tried_when_the_first_does_not_answer(d: Dir) -> None:
    c = d.client(urls=(d.dead_url, d.settings.urls[0]))
    assert c.find_user("alice") is not None
    assert c.answered == d.settings.urls[0]


@contract(ALL)
def test_a_wrong_service_password_is_the_directory_unusable(d: Dir) -> None:
    with pytest.raises(DirectoryUnavailable, match="service account"):
        d.client(bind_password="not-the-service-password").ping()


@contract(TLS)
def test_a_certificate_of_another_ca_is_refused(d: Dir) -> None:
    other = DirectoryCA.make("another CA")
    for kw in ({"ca_pem": other.pem}, {"ca_pem": None}, {"urls": (d.starttls_url,), "starttls": True,
                                                         "ca_pem": other.pem}):  # fmt: skip
        with pytest.raises(DirectoryUnavailable, match="not trusted"):
            d.client(**kw).ping()


@contract(TLS)
def test_starttls_on_ldap_urls(d: Dir) -> None:
    c = d.client(urls=(d.starttls_url,), starttls=True)
    e = c.find_user("alice")
    assert e is not None
    c.check_password(e.dn, PASSWORD)


@contract(TLS)
def test_a_certificate_for_another_name_is_refused(d: Dir) -> None:
    # The server answers on a second address its certificate does not name: refused, whatever the CA.
    with pytest.raises(DirectoryUnavailable, match="certificate"):
        d.client(urls=(d.other_url,), timeout_s=2.0).ping()
