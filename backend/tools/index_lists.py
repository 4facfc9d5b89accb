"""Enter every stored image, job and generation in its owner's list (the index the list
routes page through). Safe to repeat and safe while the API runs: entries are created only
if absent. Records stored before lists existed are listed once this has run.

    cd backend && python -m tools.index_lists
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from config import settings_or_exit
from mv.jobs import JobRecord
from services.asset_persistence import CharacterReferenceRecord
from services.asset_persistence.listing import CharacterReferenceIndex
from services.generation.records import (
    ALL_GENERATIONS,
    GENERATION_INDEX_ROOT,
    GENERATIONS_PREFIX,
    GenerationRecord,
)
from services.jobs import ALL_JOBS, JOB_INDEX_ROOT, JOB_RECORDS_PREFIX
from services.owner_index import OwnerIndex
from services.storage import ObjectNotFoundError, StorageBackend, get_storage_backend

_UUID = "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
# The records lists are made of, by the prefix they live under and the shape of their key.
RECORDS = {
    "image": ("character_references/", re.compile(rf"character_references/{_UUID}\.json")),
    "job": (f"{JOB_RECORDS_PREFIX}/", re.compile(rf"{JOB_RECORDS_PREFIX}/[^/]+\.json")),
    "generation": (f"{GENERATIONS_PREFIX}/", re.compile(rf"{GENERATIONS_PREFIX}/{_UUID}\.json")),
}


def enter(storage: StorageBackend, kind: str, key: str, *, was_unowned: bool = False) -> bool:
    """Enter the record under `key` in its owner's list; `was_unowned`: it was just given an
    owner, so take it out of the list of records with none. False when the record is gone."""
    try:
        raw = storage.get_bytes(key)
    except ObjectNotFoundError:  # deleted since it was listed
        return False
    if kind == "image":
        image = CharacterReferenceRecord.model_validate_json(raw)
        CharacterReferenceIndex(storage).enter(image, None if was_unowned else image.owner)
        return True
    if kind == "job":
        job = JobRecord.model_validate_json(raw)
        owner, created_at, item_id = job.owner, job.created_at, job.job_id
        index, scope = OwnerIndex(storage, JOB_INDEX_ROOT), ALL_JOBS
    else:
        generation = GenerationRecord.model_validate_json(raw)
        owner, created_at, item_id = (
            generation.owner,
            generation.created_at,
            generation.generation_id,
        )
        index, scope = OwnerIndex(storage, GENERATION_INDEX_ROOT), ALL_GENERATIONS
    index.add(owner, [scope], created_at, item_id)
    if was_unowned:
        index.remove(None, [scope], created_at, item_id)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Enter every record in its owner's list; exit 0."""
    parser = argparse.ArgumentParser(prog="python -m tools.index_lists", description=__doc__)
    parser.parse_args(argv)
    storage = get_storage_backend(settings_or_exit())
    counts = dict.fromkeys(RECORDS, 0)
    try:
        for kind, (prefix, shape) in RECORDS.items():
            for key in storage.list_keys(prefix):
                if shape.fullmatch(key) and enter(storage, kind, key):
                    counts[kind] += 1
    finally:
        storage.close()
    print(", ".join(f"{count} {kind}(s)" for kind, count in counts.items()) + " listed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
