"""Edge deployment and compression pipeline for compact CNNs."""

__version__ = "0.1.0"
