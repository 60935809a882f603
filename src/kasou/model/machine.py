"""A VM's virtual CPU model and machine type: what the guest sees must not change under it.

**CPU models.** A guest that booted on one host's CPU features must find the same ones after a live
migration, on whatever host it lands. kasou names a few migration-safe models, each a QEMU base model
with a fixed list of features that every x86-64 server of the last decade has (and QEMU's TCG too):

* ``x86-64-v2-AES`` (the default, as Proxmox VE's): SSE4.2, POPCNT, SSSE3, CMPXCHG16B, LAHF and AES-NI
  with PCLMULQDQ; what current Windows Server and RHEL 9 require. PCLMULQDQ came with AES-NI in every
  CPU that has it (Westmere, Bulldozer): Linux's AES-GCM code uses it whenever AES-NI is there, and
  under TCG, which executes only what the model declares, a guest without it oopses loading
  ``aesni_intel`` (its module load then never ends, and shutdown waits 90 s for udev).
* ``x86-64-v2``: the same without AES-NI.
* ``x86-64-v3``: v2-AES plus AVX, AVX2, BMI1/2, F16C, FMA, MOVBE, XSAVE (Haswell, 2013, and later).
* ``qemu64``: QEMU's own default, for a guest imported from a host that gave it no more.
* ``host``: the host's own CPU, the fastest, but migration-safe only between identical hosts, and only
  under KVM (refused where a host runs TCG).

QEMU 7.2 has no named ``x86-64-v2-AES`` model (later versions do): these are spelled out as a base
model with features, so a VM sees the same features whatever QEMU version runs it.

**Machine type.** A VM is pinned at creation to the versioned q35 machine of the QEMU that created it
(``pc-q35-7.2``), not to the ``q35`` alias, which names the newest machine of whatever QEMU runs it: a
VM keeps its virtual hardware across QEMU upgrades, and both ends of a migration run the same machine.
"""

from __future__ import annotations

import re

from kasou.errors import InvalidSpec

_V2 = "+cx16,+lahf-lm,+popcnt,+pni,+sse4.1,+sse4.2,+ssse3"
_V3 = "+avx,+avx2,+bmi1,+bmi2,+f16c,+fma,+movbe,+xsave,+abm"

CPU_MODELS: dict[str, str] = {
    "x86-64-v2-AES": f"qemu64,{_V2},+aes,+pclmulqdq",
    "x86-64-v2": f"qemu64,{_V2}",
    "x86-64-v3": f"qemu64,{_V2},+aes,+pclmulqdq,{_V3}",
    "qemu64": "qemu64",
    "host": "host",
}
DEFAULT_CPU = "x86-64-v2-AES"
KVM_ONLY_CPUS = ("host",)

DEFAULT_MACHINE = "q35"  # the alias: what a VM created before kasou pinned machines runs
_MACHINE_RE = re.compile(r"(q35|pc-q35-\d{1,2}\.\d{1,2})")


def validate_cpu(cpu: str) -> str:
    """``cpu`` if kasou knows the model, else InvalidSpec listing the models."""
    if cpu not in CPU_MODELS:
        raise InvalidSpec(f"unknown CPU model {cpu!r}; one of: {', '.join(CPU_MODELS)}", field="cpu")
    return cpu


def qemu_cpu(cpu: str) -> str:
    """The ``-cpu`` value of a kasou CPU model."""
    return CPU_MODELS[validate_cpu(cpu)]


def validate_machine(machine: str) -> str:
    """``machine`` if it is a q35 machine type (``q35`` or a versioned ``pc-q35-X.Y``), else InvalidSpec."""
    if not _MACHINE_RE.fullmatch(machine):
        raise InvalidSpec(
            f"machine must be a q35 machine type such as pc-q35-7.2 (or q35), not {machine!r}", field="machine"
        )
    return machine


def pinned_machine(qemu_version: str) -> str:
    """The versioned q35 machine of a QEMU version (``7.2.22`` → ``pc-q35-7.2``); the alias if it is unknown."""
    m = re.match(r"(\d{1,2})\.(\d{1,2})", qemu_version.strip())
    return f"pc-q35-{m.group(1)}.{m.group(2)}" if m else DEFAULT_MACHINE
