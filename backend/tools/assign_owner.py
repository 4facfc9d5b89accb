"""Give what has no owner to one: image sidecars, job records and generation records stored
with no authentication on (or before owners existed), and jobs a worker persisted without a
record.

    cd backend && python -m tools.assign_owner alice           # lists what would change
    cd backend && python -m tools.assign_owner alice --apply   # changes it

A record is replaced only if it is unchanged since it was read, and a job record is created
only if none exists, so the command is safe while the API runs: a record that got an owner
in the meantime keeps it. API replicas remember images they served (with their owner) until
they restart: restart them after `--apply`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence

from config import settings_or_exit
from mv.jobs import JobRecord
from services.asset_persistence import JobManifest
from services.jobs import job_record_key
from services.storage import (
    ObjectNotFoundError,
    PreconditionFailedError,
    StorageBackend,
    get_storage_backend,
)
from tools import index_lists

# The records that carry an owner, by the prefix they live under and the shape of their key.
RECORDS = index_lists.RECORDS
_MANIFEST = re.compile(r"jobs/([^/]+)/manifest\.json")
MAX_ATTEMPTS = 5


def ownerless(storage: StorageBackend) -> list[tuple[str, str]]:
    """(kind, key) of every record with no owner, and of every job with no record."""
    found = []
    for kind, (prefix, shape) in RECORDS.items():
        for key in storage.list_keys(prefix):
            if shape.fullmatch(key) and _has_no_owner(storage, key):
                found.append((kind, key))
    for key in storage.list_keys("jobs/"):
        manifest = _MANIFEST.fullmatch(key)
        if manifest and not storage.exists(job_record_key(manifest.group(1))):
            found.append(("job without a record", key))
    return found


def _has_no_owner(storage: StorageBackend, key: str) -> bool:
    try:
        return json.loads(storage.get_bytes(key)).get("owner") is None
    except ObjectNotFoundError:  # deleted since it was listed
        return False


def assign(storage: StorageBackend, kind: str, key: str, owner: str) -> bool:
    """Give one record (or a job with no record) to `owner`; False if it has one by now."""
    manifest = _MANIFEST.fullmatch(key)
    if manifest:
        job_id = manifest.group(1)
        created = JobManifest.model_validate_json(storage.get_bytes(key)).created_at
        record = JobRecord(job_id=job_id, created_at=created, owner=owner)
        try:
            storage.put_if_absent(
                job_record_key(job_id),
                record.model_dump_json(indent=2).encode(),
                "application/json",
            )
        except PreconditionFailedError:
            return False
        index_lists.enter(storage, "job", job_record_key(job_id))
        return True
    for _ in range(MAX_ATTEMPTS):
        current = storage.get_versioned(key)
        data = json.loads(current.data)
        if data.get("owner") is not None:
            return False
        data["owner"] = owner
        try:
            storage.put_if_match(
                key, json.dumps(data, indent=2).encode(), "application/json", current.version
            )
        except PreconditionFailedError:
            continue  # changed since it was read: look again
        index_lists.enter(storage, kind, key, was_unowned=True)  # into the owner's lists
        return True
    raise RuntimeError(f"{key} kept changing; run the command again")


def main(argv: Sequence[str] | None = None) -> int:
    """List (or, with --apply, assign) what has no owner; exit 0."""
    parser = argparse.ArgumentParser(prog="python -m tools.assign_owner", description=__doc__)
    parser.add_argument("owner", help="the owner to give them to: an API key's name or a sub")
    parser.add_argument("--apply", action="store_true", help="change them (default: list)")
    args = parser.parse_args(argv)
    owner = args.owner.strip()
    if not 0 < len(owner) <= 256 or not owner.isprintable():
        parser.error("the owner must be 1-256 printable characters")
    storage = get_storage_backend(settings_or_exit())
    try:
        found = ownerless(storage)
        for kind, key in found:
            changed = assign(storage, kind, key, owner) if args.apply else True
            verb = ("assigned" if changed else "kept (it has an owner now)") if args.apply else ""
            print(f"{kind}: {key} {verb}".rstrip())
    finally:
        storage.close()
    action = "assigned to" if args.apply else "would go to (run with --apply)"
    print(f"{len(found)} without an owner; {action} {owner}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
