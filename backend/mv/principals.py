"""Principals: who a request is, the owner of what it stores, and what it may see."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The key of a request's Principal in its ASGI state (AuthMiddleware puts it there).
PRINCIPAL = "principal"
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

    def may_see(self, owner: str | None) -> bool:
        """Whether a record of `owner` exists for this principal: its own, or any for an
        operator. A record stored before owners existed (None) is an operator's only."""
        return self.operator or (owner is not None and owner == self.owner)


# The one principal of a server without authentication (and of the Python API).
EVERYONE = Principal(owner=None, operator=True, credential="none")
