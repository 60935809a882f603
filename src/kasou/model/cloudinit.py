"""cloud-init's NoCloud seed: a VM's identity at its first boot (hostname, SSH keys, address, user-data). Pure.

``kasou vm create … --hostname H --ssh-key FILE --ip CIDR --gateway ADDR --user-data FILE`` records a
:class:`CloudInit` with the VM. At every start the VM's host writes a small read-only disk labelled
``cidata`` from it (:mod:`kasou.hypervisor.qemu.seed`) holding the three files NoCloud reads:

* ``meta-data``: ``instance-id`` (the VM's uuid, so cloud-init runs its first-boot steps once per VM:
  a linked clone of a template is a new instance and takes its own identity), ``local-hostname`` and
  ``public-keys`` (the SSH keys, which cloud-init gives the image's default user);
* ``user-data``: the file given as it is (``#cloud-config``, a script, ...), else an empty
  ``#cloud-config``;
* ``network-config`` (version 2), only with ``--ip``: that address (and gateway, DNS servers) on the
  VM's first NIC, matched by its MAC address; without it the guest does what its image does (DHCP).

The seed is made from the record at each start and on a migration's destination: nothing of it is a
file to copy, back up or restore. The user-data is kept in kasou's store as given: put no passwords in
it (give SSH keys).
"""

from __future__ import annotations

import ipaddress
import json
import re

from pydantic import BaseModel, ConfigDict, Field

from kasou.errors import InvalidSpec

MAX_USER_DATA = 64 * 1024
MAX_KEYS = 32
MAX_DNS = 3
_HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_KEY_TYPES = (
    "ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com", "sk-ecdsa-sha2-nistp256@openssh.com",
)  # fmt: skip
_USER_DATA_STARTS = ("#cloud-config", "#!", "#include", "#cloud-boothook", "Content-Type:", "## template: jinja")


class CloudInit(BaseModel):
    """What a VM's NoCloud seed says (see the module's doc)."""

    model_config = ConfigDict(extra="forbid")

    hostname: str | None = None  # default: the VM's name
    ssh_keys: list[str] = Field(default_factory=list)  # OpenSSH public keys, one per entry
    ip: str | None = None  # CIDR on the first NIC, e.g. 10.20.0.15/24; None: the image's default (DHCP)
    gateway: str | None = None
    dns: list[str] = Field(default_factory=list)
    user_data: str | None = None

    def check(self) -> None:
        if self.hostname is not None and not _HOSTNAME.match(self.hostname):
            raise InvalidSpec(
                f"hostname {self.hostname[:80]!r} is not a host name (letters, digits and '-', at most 63, "
                "not starting or ending with '-')",
                field="cloud_init",
            )
        if len(self.ssh_keys) > MAX_KEYS:
            raise InvalidSpec(f"at most {MAX_KEYS} SSH keys, not {len(self.ssh_keys)}", field="cloud_init")
        for key in self.ssh_keys:
            check_ssh_key(key)
        if self.ip is not None:
            try:
                iface = ipaddress.ip_interface(self.ip)
            except ValueError:
                raise InvalidSpec(f"--ip {self.ip[:60]!r} is not an address with its prefix, e.g. 10.20.0.15/24",
                                  field="cloud_init") from None  # fmt: skip
            if "/" not in self.ip:
                raise InvalidSpec(f"--ip {self.ip} needs its prefix length, e.g. {self.ip}/24", field="cloud_init")
            if self.gateway is not None:
                gw = _address(self.gateway, "--gateway")
                if gw.version != iface.version or gw not in iface.network:
                    raise InvalidSpec(f"the gateway {self.gateway} is not in {iface.network}", field="cloud_init")
        elif self.gateway is not None or self.dns:
            raise InvalidSpec("--gateway and --dns go with --ip (without it the guest asks DHCP)", field="cloud_init")
        if len(self.dns) > MAX_DNS:
            raise InvalidSpec(f"at most {MAX_DNS} DNS servers", field="cloud_init")
        for server in self.dns:
            _address(server, "--dns")
        if self.user_data is not None:
            if len(self.user_data.encode()) > MAX_USER_DATA:
                raise InvalidSpec(f"user-data is larger than {MAX_USER_DATA // 1024} KiB", field="cloud_init")
            if "\0" in self.user_data or not self.user_data.lstrip().startswith(_USER_DATA_STARTS):
                raise InvalidSpec(
                    "user-data must be cloud-init's: it starts with #cloud-config, #! (a script), #include or a "
                    "MIME header",
                    field="cloud_init",
                )

    def for_clone(self) -> CloudInit:
        """What a linked clone of a template keeps: its keys and user-data, not its name or address."""
        return CloudInit(ssh_keys=list(self.ssh_keys), user_data=self.user_data)


def clone_seed(template: CloudInit | None, given: CloudInit | None) -> CloudInit | None:
    """A linked clone's seed: its template's keys and user-data, with what its create gave on top."""
    if template is None:
        return given
    base = template.for_clone()
    if given is None:
        return base
    return base.model_copy(update=given.model_dump(exclude_defaults=True))


def check_ssh_key(key: str) -> None:
    parts = key.strip().split()
    if "\n" in key.strip() or len(parts) < 2 or parts[0] not in _KEY_TYPES or len(key) > 16 * 1024:
        raise InvalidSpec(
            f"{key.strip()[:40]!r}… is not an OpenSSH public key (give the .pub file: ssh-ed25519 AAAA… comment)",
            field="cloud_init",
        )


def _address(value: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise InvalidSpec(f"{what} {value[:60]!r} is not an IP address", field="cloud_init") from None


def meta_data(ci: CloudInit, vm: str, instance_id: str) -> str:
    """NoCloud's meta-data (JSON is YAML)."""
    data: dict[str, object] = {"instance-id": instance_id, "local-hostname": ci.hostname or vm}
    if ci.ssh_keys:
        data["public-keys"] = [k.strip() for k in ci.ssh_keys]
    return json.dumps(data, indent=1) + "\n"


def user_data(ci: CloudInit) -> str:
    return ci.user_data if ci.user_data is not None else "#cloud-config\n{}\n"


def network_config(ci: CloudInit, mac: str | None) -> str | None:
    """Network config version 2 for the first NIC (by MAC), or None: the image's default (DHCP)."""
    if ci.ip is None or mac is None:
        return None
    eth: dict[str, object] = {"match": {"macaddress": mac.lower()}, "addresses": [ci.ip]}
    if ci.gateway is not None:  # gateway4/6: what cloud-init 22 (Debian 12) renders for networkd and ifupdown
        eth["gateway6" if ":" in ci.gateway else "gateway4"] = ci.gateway
    if ci.dns:
        eth["nameservers"] = {"addresses": list(ci.dns)}
    return json.dumps({"version": 2, "ethernets": {"eth0": eth}}, indent=1) + "\n"


def summary(ci: CloudInit | None) -> dict[str, object] | None:
    """What ``vm show`` says of a VM's seed: its settings, and only whether it has user-data."""
    if ci is None:
        return None
    return {
        "hostname": ci.hostname, "ip": ci.ip, "gateway": ci.gateway, "dns": list(ci.dns),
        "ssh_keys": [" ".join(k.split()[:1] + k.split()[2:3]) for k in ci.ssh_keys],  # type and comment
        "user_data": ci.user_data is not None,
    }  # fmt: skip
