"""mpsd: serve ML models from a fleet of worker processes, admitted by memory."""

__version__ = "0.1.0"
