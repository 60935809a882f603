"""Directory settings and how groups give a role (kasou.model.directory)."""

from __future__ import annotations

import pytest

from kasou.config import ROLE_NAMES
from kasou.control.ldapclient import ad_reason
from kasou.errors import InvalidSpec
from kasou.model.directory import DirectorySet, Group, GroupMapping, check_url, group_key, resolve
from kasou.model.users import Role

BASE = {"urls": ["ldaps://dc1.hospital.local"], "base_dn": "DC=hospital,DC=local",
        "bind_user": "kasou-svc@hospital.local", "bind_password": "pw"}  # fmt: skip


def _g(cn: str) -> Group:
    return Group(dn=f"CN={cn},OU=Groups,DC=hospital,DC=local", name=cn)


def test_only_ldaps_or_starttls() -> None:
    assert check_url("ldaps://dc1.hospital.local:636/", False) == "ldaps://dc1.hospital.local:636"
    assert check_url("ldap://dc1.hospital.local", True) == "ldap://dc1.hospital.local"
    with pytest.raises(InvalidSpec) as e:
        check_url("ldap://dc1.hospital.local", False)
    assert "plain text" in e.value.message and "ldaps://dc1.hospital.local" in e.value.message
    assert "--starttls" in e.value.message
    for bad in ("http://dc1", "ldaps://", "ldaps://dc1/ou=x", "dc1.hospital.local", "ldaps://dc1:99999"):
        with pytest.raises(InvalidSpec):
            check_url(bad, False)
    with pytest.raises(InvalidSpec, match="StartTLS is for ldap://"):
        check_url("ldaps://dc1", True)


def test_settings_are_checked() -> None:
    assert DirectorySet.parse(BASE).user_filter == "(&(objectClass=user)(sAMAccountName={name}))"
    for bad in ({"urls": []}, {"urls": ["ldaps://a"] * 5}, {"base_dn": "hospital"}, {"bind_password": ""},
                {"ca_pem": "not a certificate"}, {"user_filter": "(uid=fixed)"}, {"user_filter": "((uid={name})"},
                {"timeout_s": 0}, {"surprise": 1}):  # fmt: skip
        with pytest.raises(InvalidSpec):
            DirectorySet.parse({**BASE, **bad})


def test_the_most_powerful_role_wins_and_departments_and_pools_unite() -> None:
    maps = {"kasou-ops": GroupMapping(role=Role.OPERATOR, pools=["ward-a"]),
            "lab-vendors": GroupMapping(role=Role.VENDOR, departments=["lab"]),
            "pacs-vendors": GroupMapping(role=Role.VENDOR, departments=["pacs", "lab"]),
            "cn=ward b,ou=groups,dc=hospital,dc=local": GroupMapping(role=Role.CLINICIAN, pools=["ward-b"])}  # fmt: skip
    g = resolve([_g("lab-vendors"), _g("pacs-vendors")], maps)
    assert (g.role, g.departments, g.groups) == (Role.VENDOR, ["lab", "pacs"], ["lab-vendors", "pacs-vendors"])
    g = resolve([_g("lab-vendors"), _g("kasou-ops"), _g("Ward B")], maps)  # matched by DN too, without case
    assert (g.role, g.departments, g.pools) == (Role.OPERATOR, [], ["ward-a", "ward-b"])
    assert resolve([_g("canteen")], maps).role is None
    maps["lab-managers"] = GroupMapping.parse({"role": "manager", "departments": ["lab", "pacs"]})
    g = resolve([_g("lab-vendors"), _g("lab-managers")], maps)  # a manager's departments, not the vendor's
    assert (g.role, g.departments, g.groups) == (Role.MANAGER, ["lab", "pacs"], ["lab-managers"])
    assert resolve([], maps).role is None


def test_mappings_are_checked() -> None:
    with pytest.raises(InvalidSpec, match="department"):
        GroupMapping.parse({"role": "vendor"})
    with pytest.raises(InvalidSpec, match="only a vendor"):
        GroupMapping.parse({"role": "operator", "departments": ["lab"]})
    assert group_key("  CN=Ward  B,DC=x ") == "cn=ward b,dc=x"
    with pytest.raises(InvalidSpec):
        group_key(" ")


def test_ad_bind_answers() -> None:
    assert "disabled" in (ad_reason("80090308: LdapErr: DSID-0C09041C, comment: AcceptSecurityContext error, "
                                    "data 533, v4563") or "")  # fmt: skip
    assert "expired" in (ad_reason("... data 532, v893") or "")
    assert "locked" in (ad_reason("... data 775, v893") or "")
    assert ad_reason("... data 52e, v893") is None  # a wrong password: nothing more is said
    assert ad_reason("") is None


def test_config_knows_every_role() -> None:
    # config.py imports no model: its list of roles (KASOU_REQUIRE_TOTP_FOR) must follow kasou.model.users.Role
    assert set(ROLE_NAMES) == {r.value for r in Role}
