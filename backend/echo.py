"""How client input is quoted back in messages: never more than MAX_ECHOED_CHARS of it."""

from __future__ import annotations

MAX_ECHOED_CHARS = 200


def shown(value: object) -> str:
    """`value` as quoted in a message: its repr, cut to MAX_ECHOED_CHARS characters."""
    text = repr(value)
    return text if len(text) <= MAX_ECHOED_CHARS else text[: MAX_ECHOED_CHARS - 1] + "…"
