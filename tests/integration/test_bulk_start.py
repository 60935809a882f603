"""``kasou vm start --tag T`` on real QEMU: several tiny VMs started as one job, in parallel on one host."""

from __future__ import annotations

import json
import time

import pytest

from tests.integration.conftest import Kasou

pytestmark = [pytest.mark.qemu, pytest.mark.timeout(300)]


def test_vm_start_by_tag_starts_several_vms_in_parallel(kasou: Kasou) -> None:
    names = ["w1", "w2", "w3", "w4"]
    for n in names:
        kasou.run("vm", "create", n, "--image", "tiny", "--tag", "ward-a")
    kasou.run("vm", "create", "other", "--image", "tiny", "--tag", "ward-b")
    began = time.monotonic()
    job = json.loads(kasou.run("vm", "start", "--tag", "ward-a", "--parallel", "4", "--json").stdout)
    took = time.monotonic() - began
    result = job["result"]
    assert job["state"] == "succeeded" and result["succeeded"] == 4 and result["failed"] == 0, result
    assert sorted(x["vm"] for x in result["vms"]) == names
    assert result["per_host"] and set(result["per_host"].values()) == {4}
    # in parallel: the VMs' start jobs ran at the same time (admission is taken one VM at a time, the QEMU
    # starts overlap): at some moment two of them or more were running
    spans = []
    for x in result["vms"]:
        j = json.loads(kasou.run("job", "show", x["job"]).stdout)
        spans.append((j["started_at"], j["finished_at"]))
    overlap = max(sum(1 for s, f in spans if s <= t < f) for t, _ in spans)
    assert overlap >= 2, spans
    starts = sorted(kasou.vm(n)["started_at"] for n in names)
    for n in names:
        kasou.wait_ready(n, timeout=120)
    assert kasou.vm("other")["state"] == "stopped"
    again = json.loads(kasou.run("vm", "start", "--tag", "ward-a", "--json").stdout)["result"]
    assert again["skipped"] == 4 and {x["reason"] for x in again["vms"]} == {"already running"}
    # the host's shutdown (kasou-guests.service): nothing unless the system is going down (here it is not) ...
    out = kasou.run("host", "shutdown-guests", "--if-system-stopping").stdout
    assert "the system is not shutting down" in out and all(kasou.vm(n)["state"] == "running" for n in names)
    # ... then every running guest shut down gracefully, as one job, in the reverse of the start-up order
    down_began = time.monotonic()
    out = kasou.run("host", "shutdown-guests", "--host", kasou.vm("w1")["host"], "--timeout", "60", timeout=300).stdout
    down = time.monotonic() - down_began
    assert "shutdown: 4 succeeded, 0 failed, 0 skipped" in out, out
    assert all(kasou.vm(n)["state"] == "stopped" for n in names)
    print(
        f"vm start --tag: 4 VMs started in {took:.1f} s (QEMU starts {starts[-1] - starts[0]:.2f} s apart "
        f"at most, {overlap} start jobs at once); host shutdown-guests: 4 VMs shut down in {down:.1f} s"
    )
