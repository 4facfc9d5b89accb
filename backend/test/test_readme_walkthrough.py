"""The README's walk-through runs as written: every shell block marked
`<!-- readme-test: run -->`, in order, in one shell, in a temporary copy of the repository,
against the servers the blocks start themselves (the tiny model on ports 8000 and 8001, moto
on 5000, a webhook receiver on 9000). Then the promises the text makes are checked: files,
statuses, the bucket, the webhook.

A README edit that breaks a command fails this test. Every other shell block is marked
`<!-- readme-test: skip: <why> -->`: it needs what a test machine cannot have (a GPU, a Ray
cluster, real credentials) or another test runs what it shows.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from config import REPO_ROOT
from replicas import process_environment

RUN_MARKER = "<!-- readme-test: run -->"
PORTS = (8000, 8001, 5000, 9000)
# Paths outside the copy that the walk-through itself names.
SCRATCH = (Path("/tmp/video-1"), Path("/tmp/mv-s3-cache"))
# Whatever is still running when the script ends, however it ends (after the README's own stop
# block, nothing: hence `|| true`, as the trap runs under `set -e`).
STOP_SERVERS = (
    'pkill -f "python -m server --host 127.0.0.1 --port 800" || true; '
    'pkill -f "moto.server -H 127.0.0.1 -p 5000" || true; '
    'pkill -f "examples/webhook_receiver.py 9000" || true'
)
# Run by the test once the blocks are done, while moto still serves: what the bucket holds.
LIST_BUCKET = (
    ".venv/bin/python -c \"import boto3; s3 = boto3.client('s3', "
    "endpoint_url='http://127.0.0.1:5000', region_name='us-east-1'); "
    "print('\\n'.join(o['Key'] for o in s3.list_objects_v2(Bucket='mv-dev')['Contents']))\" "
    "> bucket.txt"
)


def marked_blocks(readme: str) -> list[str]:
    """The shell blocks marked to run, in README order."""
    return re.findall(re.escape(RUN_MARKER) + r"\n```bash\n(.*?)```", readme, re.S)


def test_every_shell_block_is_run_or_says_why_not() -> None:
    lines = (REPO_ROOT / "README.md").read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() == "```bash":
            marker = lines[number - 1].strip()
            skip = re.fullmatch(r"<!-- readme-test: skip: (.{10,}) -->", marker)
            assert marker == RUN_MARKER or skip, f"README line {number + 1}: no readme-test marker"


def _in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _copy_working_tree(target: Path) -> None:
    """The repository's files as they are now (edits and new files included, nothing git
    ignores), and the installed venv."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = REPO_ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    (target / ".venv").symlink_to(REPO_ROOT / ".venv")


def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    busy = [port for port in PORTS if _in_use(port)]
    if busy:
        pytest.skip(f"the walk-through's ports are in use here: {busy}")
    blocks = marked_blocks((REPO_ROOT / "README.md").read_text())
    assert len(blocks) >= 5, "the walk-through blocks lost their readme-test marker"
    copy = tmp_path / "repo"
    _copy_working_tree(copy)
    for path in SCRATCH:
        shutil.rmtree(path, ignore_errors=True)
    *walkthrough, stop = blocks
    assert stop.startswith('pkill -f "python -m server'), "the last block stops everything"
    # What the bucket holds is read while moto still serves; then the README's stop block,
    # and what it left: a port still taken, a setting still exported.
    left = (
        "echo left: ${STORAGE_BACKEND:-} ${AWS_ENDPOINT_URL:-} ${WEBHOOK_SECRET:-}.; "
        f"for port in {' '.join(map(str, PORTS))}; do "
        "(exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && echo still listening: $port; "
        "done; true"
    )
    script = "\n".join(
        ["set -euo pipefail", f"trap '{STOP_SERVERS}' EXIT", *walkthrough, LIST_BUCKET, stop, left]
    )
    (copy / "walkthrough.sh").write_text(script)
    try:
        result = subprocess.run(
            ["bash", "walkthrough.sh"],
            cwd=copy,
            env=process_environment({}),
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        subprocess.run(["bash", "-c", STOP_SERVERS], check=False)
        for path in SCRATCH:
            shutil.rmtree(path, ignore_errors=True)
    transcript = result.stdout + result.stderr
    assert result.returncode == 0, transcript[-4000:]  # every command, `cmp` included
    output = result.stdout
    # The stop block: nothing left exported, nothing left listening.
    assert "\nleft: .\n" in output
    assert "still listening" not in output
    # Local mode: the image, its thumbnail, a delete that answers 204 and then NotFound.
    assert Image.open(copy / "robot.png").format == "PNG"
    with Image.open(copy / "thumb.webp") as thumbnail:
        assert thumbnail.format == "WEBP" and max(thumbnail.size) <= 256
    assert '204\n{"detail":{"error":"NotFound"' in output  # the DELETE, then the GET after it
    # Keeping the character: a turnaround sheet and a scene made from the first candidate.
    first_candidate = json.loads((copy / "sheet.json").read_text())["metadata"]
    sheet = json.loads((copy / "sheet.json").read_text())["images"]
    assert [image["view"] for image in sheet] == ["front", "three_quarter", "side", "back"]
    (reference,) = first_candidate["reference_image_ids"]
    assert f'"reference_image_ids":["{reference}"]' in output and '"view":"back"' in output
    scene = json.loads((copy / "scene.json").read_text())
    assert scene["metadata"]["reference_image_ids"] == [reference]
    assert "playing bass on a rooftop" in scene["metadata"]["parameters_used"]["prompt"]
    # S3 mode: a 307 to the bucket, and the same bytes straight from it and through it.
    assert "307 http://127.0.0.1:5000/mv-dev/character_references/" in output
    assert (copy / "from-s3.png").read_bytes() == (copy / "via-redirect.png").read_bytes()
    # Jobs: the picked image as a file, and the worker's results in the bucket.
    assert Image.open(copy / "ref.png").format == "PNG"
    assert "frames" in output
    stored = (copy / "bucket.txt").read_text().split()
    assert "jobs/video-1/renders/take1.txt" in stored
    assert "jobs/video-1/manifest.json" in stored
    # Async: 202 with a status URL, a cancel, its signed webhook verified by the receiver,
    # and the status saying it was delivered; operations: health and version.
    assert '"status_url":"/api/mv/character_reference_jobs/' in output
    generation_id = json.loads((copy / "job.json").read_text())["generation_id"]
    received = (copy / "webhooks.log").read_text()
    assert f"verified generation.canceled {generation_id}" in received
    assert "'status': 'delivered'" in output
    # The canceled generation's event stream: its final event, and the end.
    assert f'event: canceled\ndata: {{"generation_id":"{generation_id}"' in output
    # Lists: two candidates per page, a cursor to the next, the images made from the first.
    first_page = json.loads((copy / "page1.json").read_text())
    assert len(first_page["items"]) == 2 and first_page["next_cursor"]
    assert first_page["items"][0]["id"] == scene["images"][0]["id"]  # the newest
    assert '"items":[{"job_id":"video-1"' in output
    assert '{"status":"ok"}' in output
    assert '"name":"mv-backend"' in output
