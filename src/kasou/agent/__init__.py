"""The host agent: one per physical host, the only way anything reaches QEMU.

It wraps a hypervisor driver and the host's local disks behind a small HTTP
API (a root-only unix socket on a single host; TCP between hosts later).
"""
