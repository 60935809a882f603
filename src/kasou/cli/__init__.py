"""The ``kasou`` command line."""
