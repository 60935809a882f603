"""The hypervisor layer: one driver interface (:mod:`.base`) and a QEMU driver (:mod:`.qemu`).
(The tests' fake driver lives with the tests, in ``tests/doubles``, checked against this interface
by the same contract tests as the QEMU driver: ``tests/contract``.)

Process ids, QMP socket paths and QEMU node names stay inside this layer; the
host agent speaks only in ``LaunchSpec`` and ``RuntimeInfo``. (No eager imports
here: the CLI imports small parts of this package and must start fast.)
"""
