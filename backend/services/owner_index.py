"""Per-owner indexes kept in the store itself: what lists page through, newest first.

An index entry is an empty object whose key sorts newest first and names the item:
`{root}/{owner}/{scope}/{9999999999999 - created_at in ms}-{item id}`. A page is one listing
of at most `limit + 1` keys after the cursor (S3 `StartAfter`), so it costs the same
whatever the owner has stored; entries are created with create-if-absent and removed with
the item they list. Paging by key is stable while others write: an item added meanwhile
sorts before the cursor (it is newer), one deleted meanwhile simply is not listed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from datetime import datetime

from services.storage import (
    HoldsPendingUploads,
    PreconditionFailedError,
    StorageBackend,
    StorageUnavailableError,
)

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 50
_NEWEST_MS = 9_999_999_999_999  # 13 digits: sortable until the year 2286
_CURSOR_VERSION = 1
_ENTRY_TYPE = "application/octet-stream"


class InvalidCursorError(ValueError):
    """A cursor this list did not hand out (another list's, or altered)."""


def owner_segment(owner: str | None) -> str:
    """The key segment of an owner: a hash (owner names may hold any character)."""
    if owner is None:
        return "unowned"
    return "o" + hashlib.sha256(owner.encode()).hexdigest()[:32]


def entry_name(created_at: datetime, item_id: str) -> str:
    """The last key segment of an entry: newest first, then by id."""
    inverted = _NEWEST_MS - int(created_at.timestamp() * 1000)
    return f"{inverted:013d}-{item_id}"


def entry_key(root: str, owner: str | None, scope: str, created_at: datetime, item_id: str) -> str:
    """The key of one entry of the index under `root`."""
    return f"{root}/{owner_segment(owner)}/{scope}/{entry_name(created_at, item_id)}"


def item_id_of(key: str) -> str:
    """The item id an entry's key names."""
    return key.rpartition("/")[2].partition("-")[2]


@dataclass(frozen=True, slots=True)
class IndexPage:
    """The item ids of one page, newest first, and the cursor of the next (None: the last)."""

    item_ids: list[str]
    next_cursor: str | None


class OwnerIndex:
    """One kind of item's index (`root`), partitioned by owner and by scope (a filter).

    Methods block: call them off the event loop.
    """

    def __init__(self, storage: StorageBackend, root: str) -> None:
        self.storage = storage
        self.root = root

    def _folder(self, owner: str | None, scope: str) -> str:
        return f"{self.root}/{owner_segment(owner)}/{scope}/"

    def key(self, owner: str | None, scope: str, created_at: datetime, item_id: str) -> str:
        """The key of one entry."""
        return entry_key(self.root, owner, scope, created_at, item_id)

    def add(
        self,
        owner: str | None,
        scopes: list[str],
        created_at: datetime,
        item_id: str,
        *,
        pending: bool = False,
    ) -> None:
        """List the item in each scope (created if absent: adding twice is no change).

        When the arbitrating tier cannot be reached (or, `pending`, the item itself was just
        kept as a pending upload), the entry is kept as a pending upload too, without
        waiting on the store again.
        """
        for scope in scopes:
            key = self.key(owner, scope, created_at, item_id)
            if pending:
                self._hold(key)
                continue
            try:
                self.storage.put_if_absent(key, b"", _ENTRY_TYPE)
            except PreconditionFailedError:
                pass  # listed already
            except StorageUnavailableError:
                self._hold(key)

    def _hold(self, key: str) -> None:
        if isinstance(self.storage, HoldsPendingUploads):
            self.storage.hold(key, b"", _ENTRY_TYPE)
        else:
            self.storage.put_bytes(key, b"", _ENTRY_TYPE)

    def remove(
        self, owner: str | None, scopes: list[str], created_at: datetime, item_id: str
    ) -> None:
        """Take the item out of each scope (removing a missing entry is no error)."""
        for scope in scopes:
            self.storage.delete(self.key(owner, scope, created_at, item_id))

    def page(self, owner: str | None, scope: str, limit: int, cursor: str | None) -> IndexPage:
        """One page of item ids, newest first, after `cursor` (InvalidCursorError when it is
        not one of this list's)."""
        folder = self._folder(owner, scope)
        start_after = folder if cursor is None else folder + self._decode(folder, cursor)
        keys = self.storage.list_page(folder, start_after, limit + 1)
        more = len(keys) > limit
        keys = keys[:limit]
        next_cursor = self._encode(folder, keys[-1].removeprefix(folder)) if more else None
        return IndexPage([item_id_of(key) for key in keys], next_cursor)

    # A cursor is opaque to clients: the last entry name, bound to the list it came from.

    @staticmethod
    def _list_tag(folder: str) -> str:
        return hashlib.sha256(folder.encode()).hexdigest()[:12]

    def _encode(self, folder: str, after: str) -> str:
        raw = json.dumps({"v": _CURSOR_VERSION, "l": self._list_tag(folder), "a": after})
        return base64.urlsafe_b64encode(raw.encode()).rstrip(b"=").decode()

    def _decode(self, folder: str, cursor: str) -> str:
        try:
            padded = cursor + "=" * (-len(cursor) % 4)
            fields = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
            after = fields["a"]
            valid = (
                fields["v"] == _CURSOR_VERSION
                and fields["l"] == self._list_tag(folder)
                and isinstance(after, str)
                and "/" not in after
                and after.isprintable()
            )
        except (ValueError, KeyError, TypeError, UnicodeError, binascii.Error):
            valid = False
        if not valid:
            raise InvalidCursorError("not a cursor of this list; start again without one")
        return after
