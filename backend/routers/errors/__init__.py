"""Every error reply in one shape: `{"detail": {"error", "message", ...}}`.

`shape` defines it, `handlers` maps exceptions to it, `openapi` declares it in the schema.
"""

from echo import shown
from routers.errors.handlers import FieldError, classify_error, install_error_handlers
from routers.errors.openapi import install_error_schema
from routers.errors.shape import error_body, error_response

__all__ = [
    "FieldError",
    "classify_error",
    "error_body",
    "error_response",
    "install_error_handlers",
    "install_error_schema",
    "shown",
]
