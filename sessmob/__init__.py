"""sessmob: move a running service session (state, live TCP flows, address) between devices."""

__version__ = "0.1.0"
