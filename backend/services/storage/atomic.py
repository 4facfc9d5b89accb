"""Atomic, durable file writes: temp file in the same directory, fsync, os.replace."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK_SIZE = 1024 * 1024
TEMP_PREFIX = ".tmp-"


def sha256_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def is_temp_file(path: Path) -> bool:
    """Whether `path` is an unfinished atomic write (never a stored object)."""
    return path.name.startswith(TEMP_PREFIX)


def _writer_pid(path: Path) -> int | None:
    # Temp names are ".tmp-{pid}-{random}": the pid tells whether the writer still runs.
    pid, _, rest = path.name.removeprefix(TEMP_PREFIX).partition("-")
    return int(pid) if pid.isdigit() and rest else None


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


def remove_abandoned_temp_files(root: Path) -> list[Path]:
    """Delete the temp files of writers that died mid-write (killed, power loss); return them.

    A temp file whose writing process still runs is left alone, so this is safe while other
    processes write under the same root.
    """
    removed = []
    if not root.is_dir():
        return removed
    for path in root.rglob(f"{TEMP_PREFIX}*"):
        pid = _writer_pid(path)
        if pid is None or pid == os.getpid() or _is_running(pid):
            continue
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed


def _fsync_directory(directory: Path) -> None:
    # The rename is durable only once the directory entry is flushed too.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(destination: Path, *, exclusive: bool = False) -> Iterator[BinaryIO]:
    """Yield a file handle; on success its content replaces `destination` in one step.

    With `exclusive`, the content is published only if `destination` does not exist yet
    (FileExistsError otherwise): a hard link is created-if-absent atomically, like O_EXCL,
    and readers never see a partly written file. On any error the temp file is removed and
    `destination` is left as it was.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed below on every path
        dir=destination.parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-", delete=False
    )
    temp_path = Path(handle.name)
    try:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        if exclusive:
            os.link(temp_path, destination)
            temp_path.unlink()
        else:
            temp_path.replace(destination)
    except BaseException:
        handle.close()
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_directory(destination.parent)


def write_bytes_atomic(destination: Path, data: bytes) -> None:
    """Write `data` to `destination` atomically and durably."""
    with atomic_writer(destination) as handle:
        handle.write(data)
