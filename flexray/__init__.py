"""flexray: training across heterogeneous devices on Ray."""

__version__ = "0.1.0"
