"""The backend's version, reported by /version and the OpenAPI document."""

__version__ = "0.1.0"
