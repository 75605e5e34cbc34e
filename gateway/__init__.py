"""API-token authentication gateway: the data plane and the core shared with the admin API."""

__version__ = "0.1.0"
