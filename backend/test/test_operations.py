"""Operations: health, readiness, version, metrics, request ids in JSON logs, API keys, CORS."""

from __future__ import annotations

import io
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from config import SettingsError, load_settings
from conftest import ApiHarness, BlockingGenerator, image_bytes
from fake_replicate import FakeReplicate
from observability import JsonFormatter
from services.generation.diffusion import load_pipeline

GENERATE = "/api/mv/generate_character_reference"
JOBS = "/api/mv/character_reference_jobs"
BODY = {"character_description": "a silver robot", "num_images": 1, "seed": 1}
KEY = "k" * 16 + "-client-one"
OTHER_KEY = "o" * 16 + "-client-two"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """Everything logged during the test, as the server's JSON lines."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield buffer
    root.removeHandler(handler)
    root.setLevel(level)


def log_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    """The JSON objects logged so far."""
    return [json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{")]


# ------------------------------------------------------------ health and ready


def test_health_and_version(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    assert api.client.get("/health").json() == {"status": "ok"}
    version = api.client.get("/version").json()
    assert version["name"] == "mv-backend"
    assert version["version"]


def test_not_ready_until_the_local_model_has_loaded(make_api: Callable[..., ApiHarness]) -> None:
    loaded = threading.Event()

    def slow_loader(model_id: str, device: str) -> Any:
        loaded.wait(30)
        return load_pipeline(model_id, device)

    api = make_api(image_generator="local", local_loader=slow_loader)
    before = api.client.get("/ready")
    assert before.status_code == 503
    assert before.json()["status"] == "not ready"
    assert any("still loading" in problem for problem in before.json()["problems"])
    assert api.client.get("/health").status_code == 200  # alive all the same
    loaded.set()
    api.client.post(GENERATE, json=BODY)  # waits for the load
    after = api.client.get("/ready")
    assert after.status_code == 200
    assert after.json() == {
        "status": "ready",
        "problems": [],
        "warnings": [],
        "reference_images": {"local": 0},  # the tiny SDXL-Turbo takes none
    }


def test_ready_with_replicate_alone_and_not_ready_without_any_generator(
    make_api: Callable[..., ApiHarness],
) -> None:
    configured = make_api(local_device="auto", replicate=FakeReplicate())
    assert configured.client.get("/ready").status_code == 200
    bare = make_api(local_device="auto")
    reply = bare.client.get("/ready")
    assert reply.status_code == 503
    problems = " ".join(reply.json()["problems"])
    assert "LOCAL_DEVICE=cpu" in problems and "REPLICATE_API_TOKEN" in problems


def test_not_ready_when_storage_is_unreachable(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(
        "local",
        storage_backend="s3",
        storage_bucket="unreachable-bucket",
        aws_endpoint_url="http://127.0.0.1:9",
        replicate=FakeReplicate(),
    )
    reply = api.client.get("/ready")
    assert reply.status_code == 503
    assert any(problem.startswith("storage:") for problem in reply.json()["problems"])


# --------------------------------------------------------------------- metrics


def test_metrics_cover_requests_generation_queue_and_storage(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api("s3", replicate=FakeReplicate(), local_device="auto")
    assert api.client.post(GENERATE, json=BODY).status_code == 200  # falls back to Replicate
    api.client.get(f"/api/mv/get_character_reference/{uuid.uuid4()}")
    reply = api.client.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.text
    route = "/api/mv/generate_character_reference"
    assert f'mv_http_requests_total{{method="POST",route="{route}",status="200"}} 1.0' in text
    by_id = "/api/mv/get_character_reference/{image_id}"
    assert f'mv_http_requests_total{{method="GET",route="{by_id}",status="404"}} 1.0' in text
    assert f'mv_http_request_duration_seconds_count{{method="POST",route="{route}"}} 1.0' in text
    assert 'mv_generation_duration_seconds_count{backend="replicate"} 1.0' in text
    assert 'mv_generation_fallbacks_total{backend="replicate"} 1.0' in text
    assert 'mv_generations_total{status="succeeded"} 1.0' in text
    assert "mv_generation_queue_depth 0.0" in text
    assert "mv_pending_uploads 0.0" in text
    assert 'mv_storage_operation_duration_seconds_count{backend="s3",operation="PutObject"}' in text


def test_metrics_count_storage_errors_and_pending_uploads(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(
        "local",
        storage_backend="s3",
        storage_bucket="unreachable-bucket",
        aws_endpoint_url="http://127.0.0.1:9",
    )
    reply = api.client.post(
        "/api/mv/upload_character_reference", files={"file": ("a.png", image_bytes(), "image/png")}
    )
    assert reply.status_code == 201  # kept locally, pending
    text = api.client.get("/metrics").text
    assert 'mv_storage_operation_errors_total{backend="s3",operation="PutObject"}' in text
    assert "mv_pending_uploads 3.0" in text  # the image, its sidecar and its list entry


def test_unmatched_paths_share_one_metrics_label(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    for n in range(3):
        api.client.get(f"/no/such/path/{n}")
    text = api.client.get("/metrics").text
    assert 'mv_http_requests_total{method="GET",route="unmatched",status="404"} 3.0' in text
    assert "/no/such/path" not in text


# ------------------------------------------------------------ request ids, logs


def test_request_ids_are_returned_and_logged_with_the_generation_id(
    make_api: Callable[..., ApiHarness], json_log: io.StringIO
) -> None:
    blocking = BlockingGenerator()
    blocking.release.set()
    api = make_api(image_generator="replicate", generators={"replicate": blocking})
    reply = api.client.post(JOBS, json=BODY, headers={"X-Request-ID": "client-req-7"})
    assert reply.headers["X-Request-ID"] == "client-req-7"
    generation_id = reply.json()["generation_id"]
    status_url = reply.json()["status_url"]
    for _ in range(500):
        if api.client.get(status_url).json()["status"] == "succeeded":
            break
    lines = log_lines(json_log)
    access = [line for line in lines if line.get("logger") == "mv.access"]
    submitted = next(line for line in access if line["request_id"] == "client-req-7")
    assert submitted["status"] == 202
    assert submitted["route"] == "/api/mv/character_reference_jobs"
    assert submitted["duration_ms"] >= 0
    # The generation's own log line carries the submitting request's id and its own id.
    done = next(line for line in lines if line["message"].startswith("generation succeeded"))
    assert done["request_id"] == "client-req-7"
    assert done["generation_id"] == generation_id
    polled = [line for line in access if line.get("generation_id") == generation_id]
    assert polled and all(line["request_id"] != "client-req-7" for line in polled)


def test_the_access_log_names_the_owner_never_the_key(
    make_api: Callable[..., ApiHarness], json_log: io.StringIO
) -> None:
    api = make_api(api_keys=f"alice:{KEY},{OTHER_KEY}")
    for key, request_id in ((KEY, "as-alice"), (OTHER_KEY, "as-unnamed")):
        headers = {"X-API-Key": key, "X-Request-ID": request_id}
        assert api.client.get("/api/mv/jobs/j1", headers=headers).status_code == 404
    access = {
        line["request_id"]: line
        for line in log_lines(json_log)
        if line.get("logger") == "mv.access"
    }
    assert access["as-alice"]["owner"] == "alice"
    assert access["as-unnamed"]["owner"].startswith("key-")
    assert KEY not in json_log.getvalue() and OTHER_KEY not in json_log.getvalue()


def test_bad_or_missing_request_ids_are_replaced(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    generated = api.client.get("/health").headers["X-Request-ID"]
    assert len(generated) == 32
    for bad in ("has space", "x" * 200, 'quote"d'):
        replaced = api.client.get("/health", headers={"X-Request-ID": bad}).headers["X-Request-ID"]
        assert replaced != bad and len(replaced) == 32


def test_errors_carry_the_request_id_and_no_traceback(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(local_device="auto")
    reply = api.client.post(GENERATE, json=BODY, headers={"X-Request-ID": "r-503"})
    assert reply.status_code == 503
    assert reply.headers["X-Request-ID"] == "r-503"
    assert "Traceback" not in reply.text


# -------------------------------------------------------------------- API keys


def test_api_keys_guard_every_api_route_but_not_health(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(api_keys=f"{KEY}, {OTHER_KEY}", replicate=FakeReplicate())
    for path in (f"/api/mv/get_character_reference/{uuid.uuid4()}", "/api/mv/jobs/j1"):
        missing = api.client.get(path)
        assert missing.status_code == 401
        assert missing.headers["WWW-Authenticate"] == "ApiKey"
        assert missing.json()["detail"]["error"] == "Unauthorized"
        assert api.client.get(path, headers={"X-API-Key": KEY[:-1]}).status_code == 401
        assert api.client.get(path, headers={"X-API-Key": KEY + "x"}).status_code == 401
        assert api.client.get(path, headers={"X-API-Key": KEY}).status_code == 404
        assert api.client.get(path, headers={"X-API-Key": OTHER_KEY}).status_code == 404
    # Refused before the body is read: a bad body without a key is still a 401.
    assert api.client.post(GENERATE, content=b"{not json").status_code == 401
    for open_path in ("/health", "/ready", "/version", "/metrics"):
        assert api.client.get(open_path).status_code == 200, open_path
    schema = api.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


def test_without_api_keys_no_key_is_needed(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    assert api.client.get("/api/mv/jobs/j1").status_code == 404
    # The document is the same: it declares the key, which this server does not ask for.
    schema = api.client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["ApiKey"]["name"] == "X-API-Key"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("api_keys", "short", "at least 16"),
        ("api_keys", f"{KEY},", "at least 16"),
        ("cors_origins", "https://app.example.com/path", "not an origin"),
        ("cors_origins", "*,https://app.example.com", "'*' alone"),
        ("webhook_secret", "short-and-not-standard", "must start with whsec_"),
        ("url_signing_secret", "s" * 31, "at least 32"),
        ("instance_name", "has space", "must be"),
    ],
)
def test_unsafe_settings_are_refused_naming_the_setting(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(_env_file=None, **{name: value})
    assert name.upper() in str(error.value)
    assert message in str(error.value)
    if name in ("api_keys", "webhook_secret", "url_signing_secret"):
        assert value not in str(error.value).replace(name.upper(), "")


def test_api_keys_without_a_url_signing_secret_are_refused() -> None:
    with pytest.raises(SettingsError) as error:
        load_settings(_env_file=None, api_keys=KEY)
    assert "URL_SIGNING_SECRET" in str(error.value)
    assert KEY not in str(error.value)


# ------------------------------------------------------------------------ CORS


def test_cors_allows_listed_origins_with_credentials(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(cors_origins="https://app.example.com", api_keys=KEY)
    preflight = api.client.options(
        GENERATE,
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "X-API-Key, Idempotency-Key, Content-Type",
        },
    )
    assert preflight.status_code == 200  # preflight needs no key
    assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
    assert preflight.headers["access-control-allow-credentials"] == "true"
    assert "x-api-key" in preflight.headers["access-control-allow-headers"].lower()
    simple = api.client.get("/health", headers={"Origin": "https://app.example.com"})
    assert simple.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "X-Request-ID" in simple.headers["access-control-expose-headers"]
    stranger = api.client.get("/health", headers={"Origin": "https://evil.example.net"})
    assert "access-control-allow-origin" not in stranger.headers


def test_cors_wildcard_never_allows_credentials(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api(cors_origins="*")
    reply = api.client.get("/health", headers={"Origin": "https://anywhere.example"})
    assert reply.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in reply.headers


def test_no_cors_headers_unless_configured(make_api: Callable[..., ApiHarness]) -> None:
    api = make_api()
    reply = api.client.get("/health", headers={"Origin": "https://app.example.com"})
    assert "access-control-allow-origin" not in reply.headers
