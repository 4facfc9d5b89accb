"""A Ray cluster with Serve's HTTP proxy: for make worker, the Ray tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from config import BACKEND_DIR

# Serve gives a starting HTTP proxy 5 s to answer its ready check, and kills it after three
# misses; on a busy machine (two cores shared with another cluster's replicas) a proxy can
# need longer than that just to start its process, and serve.start then fails with
# ActorDiedError. The controller reads this when it starts.
PATIENT_PROXY_START = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30"}


@contextlib.contextmanager
def serve_on_ray(
    host: str,
    port: int,
    *,
    address: str | None = None,
    import_paths: Sequence[Path] = (),
    env_vars: dict[str, str] | None = None,
    **ray_options: Any,
) -> Iterator[str]:
    """Start a single-node Ray cluster (or join the one at `address`) with Serve's proxy on
    host:port; yield the proxy's URL. On exit Serve stops too, unless the cluster was joined.

    Replicas import the backend's modules (and `import_paths`) wherever Ray starts them.
    """
    import ray
    from ray import serve

    paths = os.pathsep.join(str(path) for path in (BACKEND_DIR, *import_paths))
    env = {"PYTHONPATH": paths, **(env_vars or {})}
    ray_options.setdefault("include_dashboard", False)
    ray.init(address=address, runtime_env={"env_vars": env}, **ray_options)
    try:
        serve.start(
            http_options={"host": host, "port": port},
            controller_options={"runtime_env": {"env_vars": PATIENT_PROXY_START}},
        )
        yield f"http://{host}:{port}"
    finally:
        if address is None:
            serve.shutdown()
        ray.shutdown()
