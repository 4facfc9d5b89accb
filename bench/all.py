"""Every benchmark of the project in one run, printed as one table of ratios.

Run with `make bench`. Each row sets a figure of the backend against a bare baseline measured
in the same run (bare boto3, a bare Starlette app, the bare pipeline, the idle server), so the
ratio means the same on any machine:
- storage: presigning and persisting through AssetPersistenceService vs bare boto3 (moto S3);
- contention: attaches to one job from 8 writers on two API replicas vs one writer (S3, and
  one shared OUTPUT_DIR), with the retries per attach and a check that none was lost;
- serving: image GETs through the API vs bare Starlette apps, local bytes and 307 redirects;
- thumbnails: bytes to show 4 candidates as thumbnails vs originals, and thumbnail GETs vs
  original GETs;
- the event loop: /health latency while generations run vs idle;
- lists and events: a list page for an owner with 10,000 images vs 100 (S3 on moto), and the
  time from a progress step to the client over the event stream vs 1 s polling;
- generation: the API end to end vs the bare pipeline (tiny FLUX on the CPU);
- references: a 4-view turnaround sheet from a stored reference through the API vs the bare
  pipeline call with the same arguments (tiny FLUX.2 [klein] on the CPU);
- the worker tier: the API in front of the Ray Serve worker app (batching across requests,
  the worker path's overhead, /health while the worker generates), in a private network
  namespace (make bench runs it in one);
- with CUDA: real-size FLUX.1-schnell and SDXL-Turbo, generator vs bare pipeline, and in the
  worker app at batch 1, 4 and 8.
For "/s" units higher is better; for "s" and "ms" lower is.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

# The pipelines' own warnings (prompt truncation, optional packages) would bury the table.
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import contention
import generation
import gpu_generation
import health_under_load
import lists
import references
import run as storage
import serving
import thumbnails
import worker_tier
from report import CPU_ROWS, GPU_ROW_PREFIX, Row, print_table


def main() -> int:
    """Run every benchmark, then print the one table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and requests")
    options = parser.parse_args()
    rounds = 3 if options.quick else 5
    started = time.perf_counter()
    rows: list[Row] = []
    steps = [
        ("storage", lambda: asyncio.run(storage.measure(rounds))),
        ("contention", lambda: contention.measure(32 if options.quick else 64)),
        # Short rounds taking turns: 20 x 250 requests per server (quick: 6 x 250).
        ("serving", lambda: serving.measure(250, 6 if options.quick else 20)),
        ("thumbnails", lambda: thumbnails.measure(250, 6 if options.quick else 20)),
        ("event loop", lambda: health_under_load.measure(300 if options.quick else 500)),
        ("lists and events", lambda: lists.measure(rounds, 30 if options.quick else 60)),
        ("generation", lambda: generation.measure(rounds)),
        ("references", lambda: references.measure(rounds)),
        ("worker tier", lambda: worker_tier.measure(rounds)),
        ("GPU", lambda: gpu_generation.measure(3)),
    ]
    for name, step in steps:
        print(f"running the {name} benchmark...", file=sys.stderr, flush=True)
        rows += step()
    print()
    print_table(rows, title=f"All benchmarks, one run ({time.perf_counter() - started:.0f} s)")
    if not any(row.name.startswith(GPU_ROW_PREFIX) for row in rows):
        print("GPU rows: skipped, no CUDA device here (`make bench-gpu` on a CUDA machine).")
    print("ratio = backend / baseline; '/s' units: higher is better, 's'/'ms': lower is.")
    produced = tuple(row.name for row in rows if not row.name.startswith(GPU_ROW_PREFIX))
    if produced != CPU_ROWS:
        print("error: the rows differ from CPU_ROWS in bench/report.py; update it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
