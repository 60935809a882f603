"""The QEMU driver: command lines, the QMP monitor, process supervision."""
