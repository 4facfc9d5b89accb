"""Every error reply in one shape: `{"detail": {"error", "message", ...}}`.

`shape` defines it (and its OpenAPI models), `handlers` maps exceptions to it.
"""

from echo import shown
from routers.errors.handlers import FieldError, classify_error, install_error_handlers
from routers.errors.shape import ErrorReply, error_body, error_response

__all__ = [
    "ErrorReply",
    "FieldError",
    "classify_error",
    "error_body",
    "error_response",
    "install_error_handlers",
    "shown",
]
