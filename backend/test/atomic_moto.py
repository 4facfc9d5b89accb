"""moto's S3 with conditional writes decided atomically, as S3 decides them.

moto checks a PUT's `If-None-Match` / `If-Match` and then stores the object, in two steps: two
concurrent conditional PUTs of one key can both pass the check. S3 applies the condition and
the write as one step. Serialising moto's object writes gives the test double S3's promise,
so tests of concurrent writers test the backend, not a race inside the double.

Imported by the tests (in-process moto and the threaded server); run as a script, it is moto's
server with the same fix, for benchmarks that start it in its own process.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from moto.s3.responses import S3Response

_WRITES = ("_key_response_put", "_key_response_post", "_key_response_delete")
_lock = threading.RLock()


def _serialised(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def write(*args: Any, **kwargs: Any) -> Any:
        with _lock:
            return method(*args, **kwargs)

    write.mv_serialised = True  # type: ignore[attr-defined]
    return write


def make_conditional_writes_atomic() -> None:
    """Serialise moto's object writes (idempotent)."""
    for name in _WRITES:
        method = getattr(S3Response, name)
        if not getattr(method, "mv_serialised", False):
            setattr(S3Response, name, _serialised(method))


if __name__ == "__main__":
    from moto.server import main

    make_conditional_writes_atomic()
    sys.exit(main(sys.argv[1:]))
