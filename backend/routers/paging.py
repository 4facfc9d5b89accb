"""The query every list route takes: `limit`, `cursor`, and (operators only) `owner`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query

from routers.deps import PrincipalDep
from routers.errors import FieldError
from services.owner_index import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE

MAX_CURSOR_CHARS = 512
MAX_OWNER_CHARS = 256


@dataclass(frozen=True, slots=True)
class PageRequest:
    """Whose records to list, how many, and after which cursor."""

    owner: str | None
    limit: int
    cursor: str | None


async def page_request(
    principal: PrincipalDep,
    limit: Annotated[
        int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")
    ] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None,
        Query(max_length=MAX_CURSOR_CHARS, description="a `next_cursor` of this list"),
    ] = None,
    owner: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_OWNER_CHARS,
            description="operators: list this owner's records instead of their own",
        ),
    ] = None,
) -> PageRequest:
    """The caller's own records, or (operators only) `owner`'s."""
    if owner is not None and owner != principal.owner and not principal.operator:
        raise FieldError(("query", "owner"), "only operators may list another owner's records")
    return PageRequest(owner if owner is not None else principal.owner, limit, cursor)


PageDep = Annotated[PageRequest, Depends(page_request)]
