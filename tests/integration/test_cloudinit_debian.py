"""cloud-init on the debian image, through the CLI: a template with an SSH key and user-data, and a linked clone
of it given its own host name and address, which it takes at its first boot (its user-data prints what the
guest sees on its serial console, and its guest agent tells kasou: ``vm show``'s ``guest``).

Minutes under TCG: ``-m debian``. Run under the machine's QEMU lock.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import KASOU, Kasou

pytestmark = [pytest.mark.qemu, pytest.mark.debian, pytest.mark.timeout(1800)]

BUILD_TIMEOUT_S = 2700
BOOT_TIMEOUT_S = 600
USER_DATA = """#cloud-config
runcmd:
  - [sh, -c, "echo \\"cloud-init $(hostname) $(ip -4 -o addr show scope global | awk '{print $4}' | head -n1) keys $(cat /home/*/.ssh/authorized_keys 2>/dev/null | grep -c it@hospital)\\" > /dev/ttyS0"]
"""


@pytest.fixture
def debian_image(kasou: Kasou) -> Path:
    images = Path(kasou.env["KASOU_IMAGES"])
    if not (images / "debian" / "manifest.json").is_file():
        r = subprocess.run([*KASOU, "image", "build", "debian"], env=kasou.env, capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S)  # fmt: skip
        assert r.returncode == 0, f"kasou image build debian failed: {r.stderr.strip()}"
    return images / "debian"


def test_a_clone_of_a_template_comes_up_with_its_own_name_and_address(kasou: Kasou, debian_image: Path,
                                                                      tmp_path: Path) -> None:  # fmt: skip
    key = tmp_path / "it.pub"
    key.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0cLnH5xpKh0V2mZ7+Jfj2n3l3k4Z7J2Uq0o6Tz0K9r it@hospital\n")
    ud = tmp_path / "user-data"
    ud.write_text(USER_DATA)
    kasou.run("vm", "create", "emr-tpl", "--image", "debian", "--memory", "512", "--ssh-key", str(key),
              "--user-data", str(ud))  # fmt: skip
    kasou.run("vm", "template", "emr-tpl")
    kasou.run("vm", "create", "ward3-emr", "--from", "emr-tpl", "--memory", "512", "--hostname", "ward3-emr",
              "--ip", "10.0.2.50/24", "--gateway", "10.0.2.2", "--start", timeout=300)  # fmt: skip
    shown = kasou.vm("ward3-emr")["cloud_init"]
    assert shown["hostname"] == "ward3-emr" and shown["ssh_keys"] == ["ssh-ed25519 it@hospital"], shown
    line = kasou.wait_for(
        "the guest's cloud-init line",
        lambda: re.search(r"cloud-init (\S+) (\S+) keys (\d+)", kasou.log("ward3-emr")),
        timeout=BOOT_TIMEOUT_S, every=2,
    )  # fmt: skip
    assert line.groups() == ("ward3-emr", "10.0.2.50/24", "1"), kasou.log("ward3-emr")[-3000:]
    guest = kasou.wait_for(  # and as its guest agent tells kasou
        "the guest agent's host name and address",
        lambda: (g := kasou.vm("ward3-emr")["guest"])["agent"] and "10.0.2.50" in g["ips"] and g,
        timeout=120, every=1,
    )  # fmt: skip
    assert guest["hostname"] == "ward3-emr", guest
    print("cloud-init:", json.dumps(shown))
    kasou.run("vm", "stop", "ward3-emr")
