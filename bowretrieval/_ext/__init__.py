"""Compiled kernels built from ``ext/`` (see setup.py). Import them through the typed wrappers
in the package (``bowretrieval.invfile``, ``bowretrieval.hesaff``, ...), which validate inputs."""
