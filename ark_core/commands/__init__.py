"""The ``ark`` command line: one module per command, loaded by ``cli`` on demand."""
