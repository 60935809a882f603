"""Resource figures: ``GET /metrics`` (Prometheus text format 0.0.4), ``GET /v1/metrics`` and its history.

``/metrics`` needs the API token (``Authorization: Bearer ...``) or an operator's session, like a
change would: it names every VM and host. Counters (``*_total``) are since each QEMU process or
host started; Prometheus works out rates (``rate(kasou_vm_cpu_seconds_total[1m])``). The
control plane's own short history (:mod:`kasou.control.metrics`) feeds the web UI's charts at
``GET /v1/metrics/history``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel

from kasou.api.auth import Principal
from kasou.control.metrics import Metrics, MetricsHistory
from kasou.hypervisor.stats import StatsReport

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


class Exposition:
    """Builds the text format: each family's HELP and TYPE once, then its samples."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_: str, value: float, **labels: str) -> None:
        fam = self._families.setdefault(name, (kind, help_, []))
        lab = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        fam[2].append(f"{name}{{{lab}}} {_num(value)}" if lab else f"{name} {_num(value)}")

    def text(self) -> str:
        out = []
        for name, (kind, help_, samples) in self._families.items():
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)
        return "\n".join(out) + "\n"


def exposition(reports: dict[str, StatsReport], hosts: Iterable[Any], vms: Iterable[Any]) -> str:
    """The whole ``/metrics`` page from the hosts' reports and the control plane's views."""
    e = Exposition()
    for h in hosts:
        e.add("kasou_host_up", "gauge", "1 if the host's agent is up (also in maintenance)", h.state != "down",
              host=h.name)  # fmt: skip
        e.add("kasou_host_maintenance", "gauge", "1 while the host is in maintenance", h.maintenance, host=h.name)
        e.add("kasou_host_vms_running", "gauge", "VMs running on the host", h.vms_running, host=h.name)
        e.add("kasou_host_memory_capacity_bytes", "gauge", "memory VMs may use on the host",
              h.memory_capacity_mib * 1048576, host=h.name)  # fmt: skip
        e.add("kasou_host_memory_vms_bytes", "gauge", "memory held by running VMs (with QEMU's overhead)",
              h.memory_used_mib * 1048576, host=h.name)  # fmt: skip
    for host, rep in sorted(reports.items()):
        s = rep.host
        e.add("kasou_host_cpus", "gauge", "CPUs of the host", s.cpus, host=host)
        e.add("kasou_host_cpu_busy_seconds_total", "counter", "non-idle CPU time of all CPUs since boot",
              s.cpu_busy_seconds, host=host)  # fmt: skip
        e.add("kasou_host_cpu_seconds_total", "counter", "CPU time of all CPUs since boot", s.cpu_total_seconds,
              host=host)  # fmt: skip
        e.add("kasou_host_load1", "gauge", "load average over 1 minute", s.load_1m, host=host)
        e.add("kasou_host_load5", "gauge", "load average over 5 minutes", s.load_5m, host=host)
        e.add("kasou_host_load15", "gauge", "load average over 15 minutes", s.load_15m, host=host)
        e.add("kasou_host_memory_total_bytes", "gauge", "memory of the host", s.memory_total_bytes, host=host)
        e.add("kasou_host_memory_available_bytes", "gauge", "memory available on the host (MemAvailable)",
              s.memory_available_bytes, host=host)  # fmt: skip
    for v in vms:
        e.add("kasou_vm_info", "gauge", "one per VM: its state and host as labels", 1, vm=v.name,
              state=str(v.state.value if hasattr(v.state, "value") else v.state), host=v.host or "")  # fmt: skip
        e.add("kasou_vm_vcpus", "gauge", "vCPUs of the VM", v.vcpus, vm=v.name)
        e.add("kasou_vm_memory_bytes", "gauge", "memory given to the VM", v.memory_mib * 1048576, vm=v.name)
        e.add("kasou_vm_ha", "gauge", "1 if the VM is restarted elsewhere when its host fails", v.ha, vm=v.name)
        if v.uptime_s is not None:
            e.add("kasou_vm_guest_uptime_seconds", "gauge", "the guest's own uptime from its heartbeat", v.uptime_s,
                  vm=v.name)  # fmt: skip
        if v.heartbeat_age_s is not None:
            e.add("kasou_vm_heartbeat_age_seconds", "gauge", "seconds since the guest's last heartbeat",
                  v.heartbeat_age_s, vm=v.name)  # fmt: skip
        if v.guest.agent_age_s is not None:  # its QEMU guest agent has answered since the guest started
            e.add("kasou_vm_guest_agent_age_seconds", "gauge", "seconds since the guest's QEMU guest agent answered",
                  v.guest.agent_age_s, vm=v.name)  # fmt: skip
    for host, rep in sorted(reports.items()):
        for vs in rep.vms:
            lab = {"vm": vs.name, "host": host}
            e.add("kasou_vm_cpu_seconds_total", "counter", "CPU time of the VM's QEMU process (user + system)",
                  vs.cpu_seconds, **lab)  # fmt: skip
            e.add("kasou_vm_memory_rss_bytes", "gauge", "resident memory of the VM's QEMU process", vs.rss_bytes, **lab)
            for d in vs.disks:
                dl = {**lab, "disk": d.id}
                e.add("kasou_vm_disk_read_bytes_total", "counter", "bytes the guest read from the disk",
                      d.read_bytes, **dl)  # fmt: skip
                e.add("kasou_vm_disk_write_bytes_total", "counter", "bytes the guest wrote to the disk",
                      d.write_bytes, **dl)  # fmt: skip
                e.add("kasou_vm_disk_read_ops_total", "counter", "read requests of the guest", d.read_ops, **dl)
                e.add("kasou_vm_disk_write_ops_total", "counter", "write requests of the guest", d.write_ops, **dl)
            for n in vs.nics:
                if not n.counted:
                    continue  # user networking: no counters exist
                nl = {**lab, "nic": n.id, "device": n.device or ""}
                e.add("kasou_vm_net_receive_bytes_total", "counter", "bytes the guest received (the tap's tx)",
                      n.tx_bytes, **nl)  # fmt: skip
                e.add("kasou_vm_net_transmit_bytes_total", "counter", "bytes the guest sent (the tap's rx)",
                      n.rx_bytes, **nl)  # fmt: skip
                e.add("kasou_vm_net_receive_packets_total", "counter", "packets the guest received", n.tx_packets, **nl)
                e.add("kasou_vm_net_transmit_packets_total", "counter", "packets the guest sent", n.rx_packets, **nl)
    return e.text()


class CurrentMetrics(BaseModel):
    hosts: dict[str, StatsReport]


def metrics_routes(svc: Callable[[], Any], principal: Callable[[Request], Awaitable[Principal]]) -> APIRouter:
    holder: dict[int, Metrics] = {}

    def metrics() -> Metrics:
        s = svc()
        m = holder.get(id(s))
        if m is None:
            holder.clear()
            m = holder[id(s)] = Metrics(s.agents)
        return m

    async def may_read(request: Request) -> None:
        (await principal(request)).require("read")

    r = APIRouter()

    @r.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(may_read)])
    async def prometheus() -> PlainTextResponse:
        """Prometheus text format 0.0.4: hosts (CPU, load, memory) and VMs (CPU, memory, disk and network I/O)."""
        reports = await metrics().current()
        hosts = await svc().migrations.host_views()
        vms = await svc().vms.list_all()
        return PlainTextResponse(exposition(reports, hosts, vms), media_type=CONTENT_TYPE)

    @r.get("/v1/metrics", dependencies=[Depends(may_read)])
    async def current() -> CurrentMetrics:
        """Every host's latest figures and those of the VMs running there (counters, not rates)."""
        return CurrentMetrics(hosts=await metrics().current())

    @r.get("/v1/metrics/history", dependencies=[Depends(may_read)])
    async def history(since: float | None = Query(None, ge=0)) -> MetricsHistory:
        """Rates over the last 10 minutes at 5 s (CPU %, memory, disk and network bytes/s) per host and VM."""
        return metrics().history(since)

    return r
