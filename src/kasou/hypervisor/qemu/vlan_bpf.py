"""802.1Q tagging without the kernel's VLAN driver: four tiny eBPF programs for tc (cls_bpf).

Some kernels are built without ``CONFIG_VLAN_8021Q`` (and without bridge VLAN filtering or
``act_vlan``): they cannot make the ``<uplink>.<V>`` sub-interfaces that
:mod:`kasou.hypervisor.qemu.network` normally uses. They still forward tagged frames (the tag
travels in the skb's metadata) and run eBPF, whose helpers push and pop tags. So on such a
host a network's uplink port is one end of a veth pair whose other end sits on the trunk
bridge, with these programs on that end:

* ``push(V)`` at its ingress (frames from the network towards the uplink): tag with V; a frame
  that is tagged already (a guest speaking 802.1Q itself) is dropped, so no guest can hop VLANs;
* ``pop(V)`` at its egress (frames from the uplink towards the network): only frames tagged V
  pass, untagged;
* ``untagged()`` at both ends for the network without a VLAN: only untagged frames pass.

The wire sees the same tagged frames as with sub-interfaces. Programs are assembled here
(a dozen instructions each, no compiler) and loaded with the ``bpf(2)`` system call; the tc
filter that uses a program keeps it alive after its file descriptor is closed.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

from kasou.errors import HypervisorError

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_PROG_LOAD = 5
_BPF_PROG_TYPE_SCHED_CLS = 3
_LOG_SIZE = 65536

# struct __sk_buff (include/uapi/linux/bpf.h): stable offsets of the fields read here
_SKB_VLAN_PRESENT = 20
_SKB_VLAN_TCI = 24
# helpers (enum bpf_func_id)
_SKB_VLAN_PUSH = 18
_SKB_VLAN_POP = 19
# tc verdicts for direct-action programs
TC_ACT_OK = 0
TC_ACT_SHOT = 2
_ETH_P_8021Q_BE = 0x0081  # htons(0x8100) on a little-endian machine, as the helper takes it


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    """One eBPF instruction: opcode, registers, 16-bit offset, 32-bit immediate."""
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_MOV64_REG = 0xBF  # dst = src
_MOV64_IMM = 0xB7  # dst = imm
_LDX_W = 0x61  # dst = *(u32 *)(src + off)
_AND64_IMM = 0x57  # dst &= imm
_JEQ_IMM = 0x15  # if dst == imm: pc += off
_JNE_IMM = 0x55  # if dst != imm: pc += off
_CALL = 0x85
_EXIT = 0x95


def pop_program(vlan: int) -> bytes:
    """Egress towards a network on VLAN ``vlan``: pass frames tagged ``vlan`` without their tag; drop the rest."""
    return b"".join([
        _insn(_MOV64_REG, 6, 1),  # r6 = skb
        _insn(_LDX_W, 2, 6, _SKB_VLAN_PRESENT),  # r2 = skb->vlan_present
        _insn(_JEQ_IMM, 2, 0, 7, 0),  # untagged: drop
        _insn(_LDX_W, 2, 6, _SKB_VLAN_TCI),  # r2 = skb->vlan_tci
        _insn(_AND64_IMM, 2, 0, 0, 0x0FFF),  # r2 = VLAN id
        _insn(_JNE_IMM, 2, 0, 4, vlan),  # another VLAN: drop
        _insn(_MOV64_REG, 1, 6),  # r1 = skb
        _insn(_CALL, imm=_SKB_VLAN_POP),
        _insn(_MOV64_IMM, 0, imm=TC_ACT_OK),
        _insn(_EXIT),
        _insn(_MOV64_IMM, 0, imm=TC_ACT_SHOT),  # drop:
        _insn(_EXIT),
    ])  # fmt: skip


def push_program(vlan: int) -> bytes:
    """Ingress from a network on VLAN ``vlan``: tag untagged frames with ``vlan``; drop tagged ones."""
    return b"".join([
        _insn(_MOV64_REG, 6, 1),  # r6 = skb
        _insn(_LDX_W, 2, 6, _SKB_VLAN_PRESENT),  # r2 = skb->vlan_present
        _insn(_JNE_IMM, 2, 0, 6, 0),  # tagged by the guest: drop
        _insn(_MOV64_REG, 1, 6),  # r1 = skb
        _insn(_MOV64_IMM, 2, imm=_ETH_P_8021Q_BE),  # r2 = 802.1Q
        _insn(_MOV64_IMM, 3, imm=vlan),  # r3 = VLAN id
        _insn(_CALL, imm=_SKB_VLAN_PUSH),
        _insn(_MOV64_IMM, 0, imm=TC_ACT_OK),
        _insn(_EXIT),
        _insn(_MOV64_IMM, 0, imm=TC_ACT_SHOT),  # drop:
        _insn(_EXIT),
    ])  # fmt: skip


def untagged_program() -> bytes:
    """Either direction of the untagged network: pass untagged frames, drop tagged ones."""
    return b"".join([
        _insn(_LDX_W, 2, 1, _SKB_VLAN_PRESENT),  # r2 = skb->vlan_present
        _insn(_MOV64_IMM, 0, imm=TC_ACT_OK),
        _insn(_JEQ_IMM, 2, 0, 1, 0),  # untagged: pass
        _insn(_MOV64_IMM, 0, imm=TC_ACT_SHOT),
        _insn(_EXIT),
    ])  # fmt: skip


def load(program: bytes, name: str) -> int:
    """Load a tc classifier program; returns its file descriptor (the caller closes it)."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise HypervisorError(f"VLAN tagging by eBPF is not supported on {platform.machine()}")
    code = ctypes.create_string_buffer(program, len(program))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(_LOG_SIZE)
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size,
    # log_buf, kern_version, prog_flags, prog_name[16]; the rest stays zero.
    attr = struct.pack(
        "<IIQQIIQII16s", _BPF_PROG_TYPE_SCHED_CLS, len(program) // 8, ctypes.addressof(code),
        ctypes.addressof(license_), 1, _LOG_SIZE, ctypes.addressof(log), 0, 0, name.encode()[:15],
    )  # fmt: skip
    buf = ctypes.create_string_buffer(attr.ljust(128, b"\0"), 128)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = int(libc.syscall(nr, _BPF_PROG_LOAD, buf, 128))
    if fd < 0:
        err = ctypes.get_errno()
        why = log.value.decode(errors="replace").strip().splitlines()
        raise HypervisorError(
            f"the kernel refused the VLAN tagging program {name}: {os.strerror(err)}" + (f" ({why[-1]})" if why else "")
        )
    return fd
