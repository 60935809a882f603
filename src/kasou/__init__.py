"""kasou (仮想): server and desktop virtualization for hospital information systems, on QEMU."""

__version__ = "0.1.0"
