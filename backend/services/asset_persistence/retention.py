"""Retention of unpicked candidates (CANDIDATE_RETENTION_DAYS).

Standalone candidates (`character_references/`: image, sidecar, thumbnails, and their
entries in the owners' lists) expire; a picked
image lives on as its job's copy under `jobs/`, which never expires. In S3 mode the bucket's
lifecycle rule does the expiring (installed and verified by `python -m tools.retention`). The
API sweeps the local tier in the background: in local mode that is the store itself, in S3
mode the cached copies, so that no replica serves a candidate S3 has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from botocore.exceptions import ClientError

from services.asset_persistence.deletion import delete_character_reference
from services.asset_persistence.listing import INDEX_ROOT, is_index_key
from services.asset_persistence.records import read_sidecar
from services.storage import CHARACTER_REFERENCES_PREFIX, LocalStorageBackend

logger = logging.getLogger(__name__)

LIFECYCLE_RULE_ID = "mv-candidate-retention"
CANDIDATES_PREFIX = f"{CHARACTER_REFERENCES_PREFIX}/"
SWEEP_INTERVAL_SECONDS = 3600.0
_DAY = 86_400


def candidate_rule(days: int) -> dict[str, Any]:
    """The lifecycle rule that expires standalone candidates after `days` days."""
    return {
        "ID": LIFECYCLE_RULE_ID,
        "Filter": {"Prefix": CANDIDATES_PREFIX},
        "Status": "Enabled",
        "Expiration": {"Days": days},
    }


def _current_rules(client: Any, bucket: str) -> list[dict[str, Any]]:
    try:
        return client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
            return []
        raise


def install_lifecycle_rule(client: Any, bucket: str, days: int | None) -> None:
    """Put (or, with `days` None, remove) the candidate rule, keeping the bucket's other rules."""
    rules = [rule for rule in _current_rules(client, bucket) if rule.get("ID") != LIFECYCLE_RULE_ID]
    if days is not None:
        rules.append(candidate_rule(days))
    if rules:
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket, LifecycleConfiguration={"Rules": rules}
        )
    else:
        client.delete_bucket_lifecycle(Bucket=bucket)


def lifecycle_problem(client: Any, bucket: str, days: int | None) -> str | None:
    """Why the bucket's rules do not match CANDIDATE_RETENTION_DAYS; None when they do."""
    ours = [rule for rule in _current_rules(client, bucket) if rule.get("ID") == LIFECYCLE_RULE_ID]
    if days is None:
        return f"rule {LIFECYCLE_RULE_ID} is installed but retention is off" if ours else None
    if not ours:
        return f"rule {LIFECYCLE_RULE_ID} is not installed"
    rule = ours[0]
    if rule.get("Status") != "Enabled":
        return f"rule {LIFECYCLE_RULE_ID} is disabled"
    prefix = rule.get("Filter", {}).get("Prefix", rule.get("Prefix"))
    if prefix != CANDIDATES_PREFIX:
        return f"rule {LIFECYCLE_RULE_ID} applies to {prefix!r}, not {CANDIDATES_PREFIX!r}"
    installed = rule.get("Expiration", {}).get("Days")
    if installed != days:
        return f"rule {LIFECYCLE_RULE_ID} expires after {installed} days, not {days}"
    return None


def _older_than(storage: LocalStorageBackend, key: str, cutoff: float) -> bool:
    with contextlib.suppress(FileNotFoundError):  # deleted meanwhile
        return storage.path_for(key).stat().st_mtime < cutoff
    return False


def expired_candidates(storage: LocalStorageBackend, days: int, now: float) -> list[str]:
    """Ids of standalone candidates stored more than `days` days before `now`."""
    cutoff = now - days * _DAY
    expired = set()
    for key in storage.list_keys(CANDIDATES_PREFIX):
        if not is_index_key(key) and _older_than(storage, key, cutoff):
            expired.add(key.removeprefix(CANDIDATES_PREFIX).partition(".")[0])
    return sorted(expired)


def expired_list_entries(storage: LocalStorageBackend, days: int, now: float) -> list[str]:
    """List entries written more than `days` days before `now` (those of expired images
    go with them; this finds the ones whose image is gone already)."""
    cutoff = now - days * _DAY
    return [key for key in storage.list_keys(INDEX_ROOT) if _older_than(storage, key, cutoff)]


async def sweep_expired_candidates(
    storage: LocalStorageBackend, days: int, now: float | None = None
) -> list[str]:
    """Delete candidates older than `days` days (image, sidecar, thumbnails, list entries);
    return their ids."""
    now = time.time() if now is None else now
    expired = await asyncio.to_thread(expired_candidates, storage, days, now)
    for image_id in expired:
        record = await asyncio.to_thread(read_sidecar, storage, image_id)
        await delete_character_reference(storage, image_id, record)
    for key in await asyncio.to_thread(expired_list_entries, storage, days, now):
        await asyncio.to_thread(storage.delete, key)
    if expired:
        logger.info("deleted %d candidate(s) older than %d days", len(expired), days)
    return expired


async def sweep_forever(storage: LocalStorageBackend, days: int, interval: float) -> None:
    """Sweep at start-up, then every `interval` seconds."""
    while True:
        try:
            await sweep_expired_candidates(storage, days)
        except Exception:  # the loop must outlive any single failure
            logger.exception("sweeping expired candidates failed")
        await asyncio.sleep(interval)
