"""Live progress as Server-Sent Events, over real HTTP (uvicorn on 127.0.0.1).

The generator is BlockingGenerator (the real interface): it reports a step every 20 ms until
released, so a generation stays running (or queued behind one) for as long as a test needs.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from config import Settings
from conftest import (
    API_S3_MODES,
    TEST_SIGNING_SECRET,
    BlockingGenerator,
    assert_error_shape,
    new_bucket_name,
    s3_endpoint,
)
from live_server import serve
from main import create_app
from services.generation.policy import GenerationPolicy
from services.storage.s3 import make_s3_client

JOBS = "/api/mv/character_reference_jobs"
BODY = {"character_description": "a slow snail", "num_images": 1, "include_base64": False}
ALICE = "alice-key-0123456789abcdef"
BOB = "bob-key-0123456789abcdef"


@contextlib.contextmanager
def live_api(
    make_settings: Callable[..., Settings],
    request: pytest.FixtureRequest,
    mode: str,
    **overrides: Any,
) -> Iterator[tuple[str, BlockingGenerator]]:
    """A server on loopback whose generations wait for the test; its URL and generator."""
    if mode in API_S3_MODES:
        endpoint = s3_endpoint(request, API_S3_MODES[mode])
        bucket = new_bucket_name()
        make_s3_client(region="us-east-1", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        overrides |= {"storage_backend": "s3", "storage_bucket": bucket}
        overrides |= {"aws_endpoint_url": endpoint}
    if overrides.get("api_keys"):
        overrides.setdefault("url_signing_secret", TEST_SIGNING_SECRET)
    settings = make_settings(image_generator="replicate", **overrides)
    blocking = BlockingGenerator()
    policy = GenerationPolicy("replicate", {"replicate": blocking}, timeout_seconds=60)
    try:
        with serve(create_app(settings, generation_policy=policy)) as url:
            yield url, blocking
    finally:
        blocking.release.set()


def read_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The events of a text/event-stream body as they arrive: {"event", "id", "data"} (data
    parsed as JSON), or {"comment": ...}."""
    event: dict[str, Any] = {}
    for line in response.iter_lines():
        if not line:
            if event:
                yield event
                event = {}
            continue
        if line.startswith(":"):
            yield {"comment": line[1:].strip()}
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        event[name] = json.loads(value) if name == "data" else value


def open_stream(client: httpx.Client, url: str, **headers: str) -> Any:
    return client.stream("GET", url, headers=headers)


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(20.0)) as http:
        yield http


@pytest.mark.parametrize("mode", ["local", *API_S3_MODES])
def test_a_stream_sends_queued_then_progress_then_the_final_status_and_ends(
    make_settings: Callable[..., Settings],
    request: pytest.FixtureRequest,
    client: httpx.Client,
    mode: str,
) -> None:
    with live_api(make_settings, request, mode) as (url, blocking):
        running = client.post(url + JOBS, json=BODY).json()
        assert blocking.started.wait(10)
        queued = client.post(url + JOBS, json=BODY)
        assert queued.status_code == 202
        generation_id = queued.json()["generation_id"]
        events_url = queued.json()["events_url"]
        assert events_url == f"{JOBS}/{generation_id}/events"
        with open_stream(client, url + events_url) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-cache"
            received = []
            for event in read_events(stream):
                received.append(event)
                if len(received) == 1:  # the running one goes; this one runs
                    client.delete(f"{url}{JOBS}/{running['generation_id']}")
                if event.get("event") == "progress" and event["data"]["step"] >= 3:
                    blocking.release.set()
        names = [event.get("event") for event in received]
        assert names[0] == "queued" and names[-1] == "succeeded", names
        assert set(names[1:-1]) == {"progress"}, names
        assert received[0]["data"] == {
            "generation_id": generation_id,
            "status": "queued",
            "queue_position": 1,
        }
        assert received[0]["id"] == "q.1"
        steps = [event["data"]["step"] for event in received[1:-1]]
        assert steps == sorted(set(steps)) and received[-2]["data"]["total_steps"] == 10
        final = received[-1]["data"]
        status = client.get(f"{url}{JOBS}/{generation_id}").json()
        assert final == status  # exactly the status route's body
        assert final["status"] == "succeeded" and len(final["result"]["images"]) == 1
        assert received[-1]["id"] == "f"


def test_a_resumed_stream_sends_only_what_is_newer(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest, client: httpx.Client
) -> None:
    with live_api(make_settings, request, "local") as (url, blocking):
        blocking.total_steps = 1_000_000  # a step every 20 ms: always a newer one to come
        generation_id = client.post(url + JOBS, json=BODY).json()["generation_id"]
        events_url = f"{url}{JOBS}/{generation_id}/events"
        assert blocking.started.wait(10)
        with open_stream(client, events_url) as stream:
            first = next(event for event in read_events(stream) if "event" in event)
        assert first["event"] == "progress"
        with open_stream(client, events_url, **{"Last-Event-ID": first["id"]}) as stream:
            resumed = next(event for event in read_events(stream) if "event" in event)
        assert resumed["event"] == "progress"
        assert resumed["data"]["step"] > first["data"]["step"]
        blocking.release.set()
        with open_stream(client, events_url, **{"Last-Event-ID": first["id"]}) as stream:
            last = list(read_events(stream))[-1]
        assert last["event"] == "succeeded"
        # Resuming after the final event: nothing more to send; the stream just ends.
        with open_stream(client, events_url, **{"Last-Event-ID": "f"}) as stream:
            assert list(read_events(stream)) == []
        # An id this server never sent starts the stream afresh.
        with open_stream(client, events_url, **{"Last-Event-ID": "garbage"}) as stream:
            assert [event["event"] for event in read_events(stream)] == ["succeeded"]


def test_a_cancel_mid_stream_ends_it_with_canceled(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest, client: httpx.Client
) -> None:
    with live_api(make_settings, request, "local") as (url, blocking):
        generation_id = client.post(url + JOBS, json=BODY).json()["generation_id"]
        assert blocking.started.wait(10)
        with open_stream(client, f"{url}{JOBS}/{generation_id}/events") as stream:
            received = []
            for event in read_events(stream):
                received.append(event)
                if len(received) == 1:
                    assert client.delete(f"{url}{JOBS}/{generation_id}").status_code == 200
        assert received[0]["event"] == "progress"
        assert received[-1]["event"] == "canceled"
        assert received[-1]["data"]["status"] == "canceled"
        assert received[-1]["data"]["generation_id"] == generation_id


def test_a_quiet_stream_sends_heartbeats(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest, client: httpx.Client
) -> None:
    with live_api(make_settings, request, "local", events_heartbeat_seconds=0.2) as (
        url,
        blocking,
    ):
        client.post(url + JOBS, json=BODY)
        assert blocking.started.wait(10)
        waiting = client.post(url + JOBS, json=BODY).json()  # queued, and it stays so
        with open_stream(client, url + waiting["events_url"]) as stream:
            events = read_events(stream)
            assert next(events)["event"] == "queued"
            assert next(events) == {"comment": "heartbeat"}
            assert next(events) == {"comment": "heartbeat"}


def test_with_api_keys_the_signed_events_url_opens_without_headers(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest, client: httpx.Client
) -> None:
    with live_api(make_settings, request, "local", api_keys=f"alice:{ALICE},bob:{BOB}") as (
        url,
        blocking,
    ):
        blocking.release.set()
        submitted = client.post(url + JOBS, json=BODY, headers={"X-API-Key": ALICE}).json()
        events_url = submitted["events_url"]
        path = f"{JOBS}/{submitted['generation_id']}/events"
        assert events_url.startswith(path + "?") and "signature=" in events_url
        with open_stream(client, url + events_url) as stream:  # as an EventSource would
            assert stream.status_code == 200
            assert [event["event"] for event in read_events(stream)][-1] == "succeeded"

        unsigned = client.get(url + path)
        assert unsigned.status_code == 401
        assert_error_shape(unsigned.json(), "Unauthorized")
        tampered = client.get(url + events_url[:-4] + "AAAA")
        assert tampered.status_code == 403
        assert_error_shape(tampered.json(), "InvalidSignature")
        bobs = client.get(url + path, headers={"X-API-Key": BOB})
        assert bobs.status_code == 404
        assert bobs.headers["content-type"] == "application/json"
        assert_error_shape(bobs.json(), "NotFound")
        alices = client.get(url + path, headers={"X-API-Key": ALICE})
        assert alices.status_code == 200


def test_an_unknown_generation_is_a_404_not_a_stream(
    make_settings: Callable[..., Settings], request: pytest.FixtureRequest, client: httpx.Client
) -> None:
    with live_api(make_settings, request, "local") as (url, blocking):
        blocking.release.set()
        existing = client.post(url + JOBS, json=BODY).json()["generation_id"]
        reply = client.get(f"{url}{JOBS}/6f0c3a52-8c8e-4a5a-9a59-2f5f5e0c9d11/events")
        assert reply.status_code == 404
        assert reply.headers["content-type"] == "application/json"
        assert_error_shape(reply.json(), "NotFound")
        malformed = client.get(f"{url}{JOBS}/not-a-uuid/events")
        assert malformed.status_code == 422
        long_id = client.get(
            f"{url}{JOBS}/{existing}/events", headers={"Last-Event-ID": "p." + "9" * 80}
        )
        assert long_id.status_code == 422
        fields = assert_error_shape(long_id.json(), "ValidationError")["fields"]
        assert fields[0]["loc"] == ["header", "Last-Event-ID"]
