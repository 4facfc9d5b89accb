"""A request's principal: the owner of what it stores, and whether it acts for every owner."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Credential = Literal["none", "api_key", "admin_key", "bearer", "signed_url"]


@dataclass(frozen=True)
class Principal:
    """Who a request is.

    `owner` is what records store: an API key's owner name or a JWT's `sub`; None where no
    authentication is configured (one owner: everyone) and for a signed URL (a capability
    for one path, whoever holds it). `operator` may act on every owner's records.
    """

    owner: str | None
    operator: bool
    credential: Credential

    @classmethod
    def everyone(cls) -> Principal:
        """The one principal of a server without authentication."""
        return cls(owner=None, operator=True, credential="none")
