"""qpipe: make large models fit on the GPUs people actually have."""

__version__ = "0.1.0"
