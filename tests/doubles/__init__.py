"""Test doubles: stand-ins for real equipment that the tests use instead of it.

They live with the tests, not in the installed package, and each passes the same contract
tests as the real thing (``tests/contract``): :mod:`tests.doubles.driver` is the fake
hypervisor driver, checked against the QEMU driver by ``tests/contract/test_driver_contract.py``.
"""
