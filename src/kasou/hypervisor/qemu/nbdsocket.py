"""QEMU's NBD connection to a replica, from outside the QEMU process: find its sockets in ``/proc``, borrow
one (``pidfd_getfd``) to set ``TCP_USER_TIMEOUT`` on it or to shut it down, so a replica that hangs
cannot stall the guest's writes (see :mod:`kasou.hypervisor.qemu.replication`)."""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import socket
from pathlib import Path

log = logging.getLogger(__name__)

TCP_USER_TIMEOUT_MS = 10_000
_SYS_PIDFD_GETFD = 438  # the same number on x86_64 and aarch64


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        try:
            return ipaddress.ip_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
        except (OSError, IndexError, ValueError):
            return None


def proc_addr(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    raw = bytes.fromhex(hex_addr)
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw[::-1])
    v6 = ipaddress.IPv6Address(b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return v6.ipv4_mapped or v6


def socket_fds(pid: int, host: str, port: int) -> list[int]:
    """File descriptors of process ``pid`` that are TCP connections to ``host:port``."""
    want = _ip(host)
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10:
                continue
            addr, _, rport = f[2].partition(":")
            with contextlib.suppress(ValueError):
                if int(rport, 16) == port and (want is None or proc_addr(addr) == want):
                    inodes.add(f[9])
    fds = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m and m.group(1) in inodes:
                    fds.append(int(fd))
    return sorted(fds)


def borrow(pid: int, fd: int) -> socket.socket:
    """A duplicate of another process's socket (``pidfd_getfd``): options and shutdown act on the shared socket."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return socket.socket(fileno=dup)
    finally:
        os.close(pidfd)


def cut_connections(pid: int, host: str, port: int) -> int:
    """Shut down QEMU's connections to a replica: its pending writes there fail at once. Returns how many."""
    n = 0
    for fd in socket_fds(pid, host, port):
        try:
            with borrow(pid, fd) as s:
                s.shutdown(socket.SHUT_RDWR)
            n += 1
        except OSError as e:
            log.error("cannot cut QEMU's (pid %d) connection to the replica at %s:%d: %s", pid, host, port, e)
    return n


def set_user_timeout(pid: int, host: str, port: int, ms: int = TCP_USER_TIMEOUT_MS) -> int:
    """Make the kernel drop QEMU's connections to a replica whose data stays unacknowledged ``ms``."""
    n = 0
    for fd in socket_fds(pid, host, port):
        try:
            with borrow(pid, fd) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, ms)
            n += 1
        except OSError as e:
            log.warning("cannot bound QEMU's (pid %d) connection to the replica at %s:%d: %s", pid, host, port, e)
    return n
