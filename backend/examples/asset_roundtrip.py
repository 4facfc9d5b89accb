"""Exercise the five AssetPersistenceService methods with the configured storage.

Run from backend/:  python examples/asset_roundtrip.py /path/to/image.png
With STORAGE_BACKEND=s3 (and STORAGE_BUCKET, AWS_ENDPOINT_URL) it uses S3 instead of disk.
"""

from __future__ import annotations

import asyncio
import hashlib
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from services.asset_persistence import AssetPersistenceService


def tree(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under root."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


async def main(image: Path) -> None:
    """Persist, look up, associate, persist a job, and restore it elsewhere."""
    service = AssetPersistenceService()
    image_id = str(uuid.uuid4())
    job_id = f"example-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory() as scratch:
        worker_a, worker_b = Path(scratch) / "a", Path(scratch) / "b"
        print("stored:", await service.persist_character_reference(image_id, image))
        print("url:", await service.get_character_reference_url(image_id, extension=image.suffix))
        job_urls = await service.associate_character_images_with_job(job_id, [image_id], worker_a)
        print("job:", job_urls)
        (worker_a / "frames").mkdir()
        (worker_a / "frames" / "0001.txt").write_text("frame one")
        assets = await service.persist_job_assets(job_id, worker_a)
        print("assets:", assets)
        restored = await service.download_job_assets(job_id, worker_b)
        print("restored:", restored)
        if tree(worker_a) != tree(worker_b):
            raise SystemExit("restored job differs from the original")
        print(f"ok: {service.settings.storage_backend} mode, {len(restored)} files identical")
    service.storage.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
