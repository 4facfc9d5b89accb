"""Reply models: what the API sends, every field every time."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

# Replies are sent with every field, defaults included, so the OpenAPI document marks every
# field required: a generated client types them as always there (`T | null`, not `T?`).
REPLY_CONFIG = ConfigDict(json_schema_serialization_defaults_required=True)


class Reply(BaseModel):
    """A reply body (see REPLY_CONFIG)."""

    model_config = REPLY_CONFIG
