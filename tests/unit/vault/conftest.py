from tests.unit.vault.helpers import clock, store

__all__ = ["clock", "store"]
