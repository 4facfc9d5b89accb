"""The names error replies carry in `detail.error`: one closed list that clients branch on.

The OpenAPI document declares it as an enum, so a generated client knows every name; a name
the server sends that is not here fails the contract tests.
"""

from __future__ import annotations

from typing import Literal, get_args

# Every name except ValidationError, which is the one reply that adds `fields`.
ServiceErrorName = Literal[
    # the request
    "NotFound",
    "InvalidId",
    "MethodNotAllowed",
    "TooLarge",
    "RangeNotSatisfiable",
    "UnsupportedImage",
    "CorsRefused",
    "HttpError",
    # access
    "Unauthorized",
    "InvalidToken",
    "InvalidSignature",
    "SignatureExpired",
    "IdentityProviderUnavailable",
    # state
    "JobExists",
    "IdempotencyKeyInUse",
    "ConcurrentUpdate",
    "AlreadyFinished",
    "Canceled",
    # generation
    "QueueFull",
    "WorkerBusy",
    "GeneratorUnavailable",
    "GeneratorFailed",
    "ProviderError",
    "GenerationTimeout",
    "GenerationFailed",
    "ReferencesNotSupported",
    "Interrupted",
    # storage and the server itself
    "StorageUnavailable",
    "StorageError",
    "InternalError",
]
ErrorName = Literal["ValidationError", ServiceErrorName]
ERROR_NAMES: frozenset[str] = frozenset(get_args(ServiceErrorName)) | {"ValidationError"}
