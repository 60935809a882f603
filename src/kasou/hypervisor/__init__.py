"""The hypervisor layer: one driver interface (:mod:`.base`), a QEMU driver (:mod:`.qemu`)
and a fake for tests (:mod:`.fake`).

Process ids, QMP socket paths and QEMU node names stay inside this layer; the
host agent speaks only in ``LaunchSpec`` and ``RuntimeInfo``. (No eager imports
here: the CLI imports small parts of this package and must start fast.)
"""
