"""Lists of standalone character references, per owner, newest first.

Every stored reference is entered in its owner's index (`services.owner_index`) under
`character_references/index/`: in scope `all`, in `from-{id}` for each image it was made
from, and in `job-{job_id}` for each job it was given to. The entries live under
`character_references/`, so the candidates' retention rule expires them with the images
they list. The jobs an image was given to are recorded too (`index/jobs-of/{image_id}/`), so
that deleting an image finds every entry it has with one listing.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.asset_persistence.records import CharacterReferenceRecord
from services.owner_index import IndexPage, OwnerIndex
from services.storage import CHARACTER_REFERENCES_PREFIX, StorageBackend

INDEX_ROOT = f"{CHARACTER_REFERENCES_PREFIX}/index"
ALL = "all"


def made_from_scope(image_id: str) -> str:
    """The scope of images made from the image `image_id`."""
    return f"from-{image_id}"


def job_scope(job_id: str) -> str:
    """The scope of images given to the job `job_id`."""
    return f"job-{job_id}"


def jobs_folder(image_id: str) -> str:
    """Where the jobs an image was given to are recorded (one empty object per job)."""
    return f"{INDEX_ROOT}/jobs-of/{image_id}/"


def is_index_key(key: str) -> bool:
    """Whether `key` is an index entry (not an image, sidecar or thumbnail)."""
    return key.startswith(INDEX_ROOT + "/")


@dataclass(frozen=True, slots=True)
class ListFilter:
    """Which of an owner's images a list holds: all, those made from one, or one job's."""

    reference_image_id: str | None = None
    job_id: str | None = None

    @property
    def scope(self) -> str:
        """The index scope that holds exactly these images."""
        if self.job_id is not None:
            return job_scope(self.job_id)
        if self.reference_image_id is not None:
            return made_from_scope(self.reference_image_id)
        return ALL


class CharacterReferenceIndex:
    """Enters images in their owner's index, takes them out, and pages through it. Blocking."""

    def __init__(self, storage: StorageBackend) -> None:
        self.storage = storage
        self.index = OwnerIndex(storage, INDEX_ROOT)

    def add(
        self, record: CharacterReferenceRecord, job_id: str | None = None, *, pending: bool = False
    ) -> None:
        """Enter a newly stored image (and, with `job_id`, the job it was stored into);
        `pending`: the image waits for an upload, and so do its entries."""
        scopes = [ALL, *map(made_from_scope, record.reference_image_ids or [])]
        if job_id is not None:
            scopes.append(job_scope(job_id))
            self.storage.put_bytes(jobs_folder(record.id) + job_id, b"", "application/octet-stream")
        self.index.add(record.owner, scopes, record.created_at, record.id, pending=pending)

    def add_to_job(self, record: CharacterReferenceRecord, job_id: str) -> None:
        """Enter an image in a job's scope (recorded beside the image, for its delete)."""
        marker = jobs_folder(record.id) + job_id
        self.storage.put_bytes(marker, b"", "application/octet-stream")
        self.index.add(record.owner, [job_scope(job_id)], record.created_at, record.id)

    def _scopes(self, record: CharacterReferenceRecord) -> tuple[list[str], list[str]]:
        """Every scope the image is in, and the keys recording its jobs."""
        markers = self.storage.list_keys(jobs_folder(record.id))
        jobs = [job_scope(marker.rpartition("/")[2]) for marker in markers]
        return [ALL, *map(made_from_scope, record.reference_image_ids or []), *jobs], markers

    def remove(self, record: CharacterReferenceRecord) -> None:
        """Take an image out of every scope it is in, and forget its jobs."""
        scopes, markers = self._scopes(record)
        self.index.remove(record.owner, scopes, record.created_at, record.id)
        for marker in markers:
            self.storage.delete(marker)

    def enter(self, record: CharacterReferenceRecord, previous_owner: str | None = None) -> None:
        """Enter a stored image in every scope it belongs to (safe to repeat); with
        `previous_owner`, take it out of that owner's lists (it was given to another)."""
        scopes, _ = self._scopes(record)
        self.index.add(record.owner, scopes, record.created_at, record.id)
        if previous_owner != record.owner:
            self.index.remove(previous_owner, scopes, record.created_at, record.id)

    def page(
        self, owner: str | None, which: ListFilter, limit: int, cursor: str | None
    ) -> IndexPage:
        """One page of `owner`'s image ids, newest first."""
        return self.index.page(owner, which.scope, limit, cursor)
