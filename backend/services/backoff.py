"""Retry delays: full-jitter exponential backoff that honours a server's Retry-After."""

from __future__ import annotations

import email.utils
import random
import time


def backoff_delay(
    attempt: int, *, base: float, cap: float, retry_after: float | None = None
) -> float:
    """Seconds to wait before retry number `attempt` (1 = the first retry).

    A uniform draw from [0, min(cap, base * 2**(attempt-1))], so that many clients failing
    together do not retry together; never sooner than `retry_after` (itself capped at 3 * cap,
    so that a hostile or broken header cannot park a caller for hours).
    """
    ceiling = min(cap, base * 2 ** min(attempt - 1, 62))
    jittered = random.uniform(0, ceiling)
    if retry_after is None or retry_after <= 0:
        return jittered
    return max(jittered, min(retry_after, cap * 3))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not str.isdigit alone: it accepts "²"
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
