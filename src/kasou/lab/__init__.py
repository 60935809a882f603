"""Lab helpers: real services (an etcd cluster, ...) started on loopback for tests and demos.

Nothing here is used by a production host; these classes start, break and stop the
pieces a multi-host kasou needs, so tests can run them for real.
"""
