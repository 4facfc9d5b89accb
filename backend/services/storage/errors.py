"""The storage error hierarchy; provider errors are translated into it at the backend boundary.

A malformed key is not a storage failure: it is refused before any I/O with
`mv.ids.InvalidKeyError` (a ValueError), the error of every id and key check.
"""

from __future__ import annotations

from echo import shown


class StorageError(Exception):
    """A storage operation failed; the message says which operation and key."""


class ObjectNotFoundError(StorageError, FileNotFoundError):
    """No object is stored under the key."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"no object stored under {shown(key)}")
        self.key = key


class IntegrityError(StorageError):
    """Stored bytes do not match the expected SHA-256."""

    def __init__(self, key: str, expected: str, actual: str) -> None:
        super().__init__(f"{shown(key)}: sha256 is {actual}, expected {expected}")
        self.key = key
        self.expected = expected
        self.actual = actual


class StorageUnavailableError(StorageError):
    """The store could not be reached (connection refused, timeout) after bounded retries."""


class PreconditionFailedError(StorageError):
    """A conditional write found the object not as expected: it exists already (create), or
    it changed or went away since it was read (replace). Read it again and decide anew."""

    def __init__(self, key: str, message: str | None = None) -> None:
        super().__init__(message or f"{shown(key)} changed since it was read")
        self.key = key


class ConcurrentUpdateError(StorageError):
    """A shared record kept changing under a read-modify-write; retrying later will succeed."""
