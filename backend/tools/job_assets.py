"""Move a job's files between a worker's job directory and storage, from the command line.

    cd backend && python -m tools.job_assets download JOB_ID DIR   # storage -> DIR
    cd backend && python -m tools.job_assets persist JOB_ID DIR    # DIR -> storage + manifest

Storage is configured by the same settings as the server (STORAGE_BACKEND, STORAGE_BUCKET...).
Prints the result as JSON; exits 1 with a one-line reason when the operation fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from config import SettingsError, get_settings
from services.asset_persistence import AssetPersistenceService
from services.storage import StorageError


async def _run(command: str, job_id: str, directory: Path) -> object:
    service = AssetPersistenceService(settings=get_settings())
    try:
        if command == "persist":
            return await service.persist_job_assets(job_id, directory)
        return {"files": await service.download_job_assets(job_id, directory)}
    finally:
        await asyncio.to_thread(service.storage.close)


def main(argv: Sequence[str] | None = None) -> int:
    """Run `persist` or `download` for one job directory; the exit status says how it went."""
    parser = argparse.ArgumentParser(prog="python -m tools.job_assets", description=__doc__)
    parser.add_argument("command", choices=["persist", "download"])
    parser.add_argument("job_id")
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    try:
        result = asyncio.run(_run(args.command, args.job_id, args.directory))
    except (SettingsError, StorageError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
