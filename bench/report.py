"""One table of ratios: every benchmark row is a measured figure against a baseline measured
in the same run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Every row `make bench` prints without CUDA, in order. bench/all.py checks each run against
# this list, and the test suite checks the README's table against it. With CUDA, rows named
# GPU_ROW_PREFIX... come on top.
CPU_ROWS: tuple[str, ...] = (
    "presign vs bare boto3 generate_presigned_url",
    "presign, keys new to the process, vs bare boto3",
    "persist, 1 in flight, vs bare boto3 put_object (image + sidecar)",
    "persist, 1 in flight, vs bare boto3 put_object (image only)",
    "persist, 4 in flight, vs bare boto3 put_object (image + sidecar)",
    "persist, 4 in flight, vs bare boto3 put_object (image only)",
    "attach to one job, 8 writers on 2 replicas (S3)",
    "attach to one job, 8 writers on 2 replicas (one OUTPUT_DIR)",
    "local image GET vs bare FileResponse app",
    "S3 mode, local tier's copy vs bare FileResponse app",
    "redirect (307 to S3) vs bare redirect app",
    "4 candidates as thumbnails vs originals",
    "4 noise candidates as thumbnails vs originals",
    "thumbnail GET vs original GET",
    "/health p50 under generation load vs idle",
    "/health p99 under generation load vs idle",
    "/health max under generation load vs idle",
    "list page: 10,000 vs 100 stored images (S3, moto), time",
    "list page: 10,000 vs 100 stored images (S3, moto), storage calls",
    "progress to the client: event stream vs 1 s polling, p50",
    "progress to the client: event stream vs 1 s polling, p99",
    "generation end to end vs bare pipeline: API, local storage",
    "generation end to end vs bare pipeline: API, local storage, no base64",
    "generation end to end vs bare pipeline: API, S3 storage (moto)",
    "generation end to end vs bare pipeline: API, S3 storage (moto), no base64",
    "4-view turnaround from a reference via API vs bare pipeline",
    "cross-request batching: 8 one-image requests via API + worker vs bare 1 x 8",
    "worker path overhead: 4-image request via worker vs in-process",
    "/health p99 while the worker generates vs idle (API, worker mode)",
    "/health max while the worker generates vs idle (API, worker mode)",
)
GPU_ROW_PREFIX = "real-size"


@dataclass(frozen=True)
class Row:
    """One figure of the backend and its bare baseline, in the same unit."""

    name: str
    measured: float
    baseline: float
    unit: str
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        """measured / baseline."""
        return self.measured / self.baseline

    @property
    def cost(self) -> float:
        """How much worse than the baseline, as a fraction (0 = as good, 0.1 = 10 % worse)."""
        return 1 / self.ratio - 1 if self.higher_is_better else self.ratio - 1


def print_table(rows: Iterable[Row], title: str = "") -> None:
    """Print the rows as one fixed-width table."""
    rows = list(rows)
    width = max([len(row.name) for row in rows] + [40])
    if title:
        print(title)
    print(f"{'benchmark':<{width}} {'backend':>11} {'baseline':>11} {'unit':<8} {'ratio':>7}  note")
    for row in rows:
        print(
            f"{row.name:<{width}} {row.measured:>11.3f} {row.baseline:>11.3f} {row.unit:<8}"
            f" {row.ratio:>7.3f}  {row.note}"
        )
