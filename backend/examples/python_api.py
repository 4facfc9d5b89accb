"""The README's Python API example: store an image, give it to a job, move the job's files.

Run from backend/:  ../.venv/bin/python examples/python_api.py robot.png
"""

import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `services` from any directory

from services.asset_persistence import AssetPersistenceService


async def main(image: str) -> None:
    service = AssetPersistenceService()  # storage from settings (.env, environment)
    image_id = str(uuid.uuid4())
    url = await service.persist_character_reference(image_id, image)
    print("stored:", url)
    print("found:", await service.get_character_reference_url(image_id))  # None if absent
    with tempfile.TemporaryDirectory() as work:
        job_dir, elsewhere = Path(work) / "job-1", Path(work) / "elsewhere"
        urls = await service.associate_character_images_with_job("job-1", [image_id], job_dir)
        print("in the job:", urls)
        assets = await service.persist_job_assets("job-1", job_dir)
        print("manifest:", assets["manifest"])
        files = await service.download_job_assets("job-1", elsewhere)
        print("restored:", [str(Path(file).relative_to(elsewhere)) for file in files])


asyncio.run(main(sys.argv[1]))
