"""Identifiers: an image id is a UUID, a job id matches JOB_ID_PATTERN.

They are checked before anything uses them (a request body, a storage key, a file path), so
this module sits below everything that does: the request models here in `mv/`, the storage
key layout, the services and the routes all validate with the same rules and the same error.
"""

from __future__ import annotations

import re
import uuid
from typing import Annotated

from pydantic import Field

from echo import shown

JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"
_JOB_ID = re.compile(JOB_ID_PATTERN)

# Id fields of the models (image and generation ids are UUIDs), typed as such in the OpenAPI
# document; the validators check them with parse_image_id / parse_job_id (one rule, one error).
UuidText = Annotated[str, Field(json_schema_extra={"format": "uuid"})]
JobIdText = Annotated[str, Field(json_schema_extra={"pattern": JOB_ID_PATTERN})]


class InvalidKeyError(ValueError):
    """An id, or a storage key made from ids and paths, is malformed or would escape its
    prefix; raised before any I/O (a 422 naming it at the API)."""


def parse_image_id(value: object) -> str:
    """Return the canonical form of a UUID image id, or raise InvalidKeyError."""
    if not isinstance(value, str) or not value:
        raise InvalidKeyError(f"image id must be a UUID, got {shown(value)}")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidKeyError(f"image id must be a UUID, got {shown(value)}") from None


def parse_job_id(value: object) -> str:
    """Return the job id if it matches ^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$, else raise."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        raise InvalidKeyError(
            f"job id must match [A-Za-z0-9][A-Za-z0-9_-]{{0,127}}, got {shown(value)}"
        )
    return value


def is_job_id(value: str) -> bool:
    """Whether `value` is a valid job id (no error raised)."""
    return _JOB_ID.fullmatch(value) is not None
