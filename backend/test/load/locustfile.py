"""Load scenarios for locust, run by test_load.py as a separate process (locust patches the
standard library with gevent, so it cannot share the test process).

LOAD_SCENARIO picks the users: `generate` (sync generations, as fast as answers come back) or
`images` (image GETs at a steady rate). Every request's status and time goes to the JSON file
named by LOAD_SUMMARY when locust quits: {"name": {"status": [milliseconds, ...]}}.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from locust import HttpUser, constant, constant_throughput, events, task

SCENARIO = os.environ["LOAD_SCENARIO"]
_timings: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))


@events.request.add_listener
def _record(name, response_time, response, exception, **_) -> None:
    status = getattr(response, "status_code", 0) or "no reply"
    _timings[name][str(status)].append(response_time)
    if exception is not None:
        _timings[name]["failed"].append(response_time)


@events.quitting.add_listener
def _write_summary(**_) -> None:
    Path(os.environ["LOAD_SUMMARY"]).write_text(json.dumps(_timings))


class GenerateUser(HttpUser):
    """Asks for one image, again as soon as it is answered (a short pause after a 429)."""

    wait_time = constant(0.05)
    abstract = SCENARIO != "generate"

    @task
    def generate(self) -> None:
        body = {"character_description": "a drummer", "num_images": 1, "include_base64": False}
        with self.client.post(
            "/api/mv/generate_character_reference",
            json=body,
            name="generate",
            catch_response=True,
        ) as reply:
            if reply.status_code == 200 and len(reply.json()["images"]) != 1:
                reply.failure("a 200 without its image")
            else:
                reply.success()  # the test judges statuses from the summary


class ImageUser(HttpUser):
    """Fetches stored images at a steady rate, without following redirects."""

    wait_time = constant_throughput(float(os.environ.get("LOAD_RATE_PER_USER", "20")))
    abstract = SCENARIO != "images"
    paths = os.environ.get("LOAD_IMAGE_PATHS", "").split(",")

    @task
    def get_image(self) -> None:
        path = self.paths[hash(self) % len(self.paths)]
        with self.client.get(
            path, name="image", allow_redirects=False, catch_response=True
        ) as reply:
            reply.success()
