"""The control plane: records in the store, jobs, placement, and the VM operations.

It reaches QEMU only through host agents (:class:`kasou.agent.client.AgentClient`),
so one host and many hosts run the same code.
"""
