"""Keeping the character: new images of a stored character made from its reference images.

The local generator runs a tiny FLUX.2 [klein] pipeline built by the session and loaded
through the real loading code on the CPU; Replicate runs through its real client against the
fake HTTP layer; S3 is moto over HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config import Settings
from conftest import (
    ApiHarness,
    BlockingGenerator,
    assert_error_shape,
    blocks_png,
    photo_like_png,
    wait_until,
)
from fake_replicate import FakeReplicate
from mv.character_reference import TURNAROUND, VIEW_PROMPTS, build_prompt
from receivers import webhook_receiver
from services.asset_persistence import UnsupportedImageError, fit_to_area
from services.generation.base import GenerationRequest, ReferenceImage
from services.generation.diffusion import MAX_REFERENCE_PIXELS
from services.generation.worker_protocol import WorkerGenerateRequest

GENERATE = "/api/mv/generate_character_reference"
JOBS = "/api/mv/character_reference_jobs"
UPLOAD = "/api/mv/upload_character_reference"
SCENE = "the same character playing bass on a rooftop at night"
KLEIN_REPLICATE = "black-forest-labs/flux-2-klein-4b"


def upload(api: ApiHarness, data: bytes, name: str = "ref.png") -> str:
    """Store an image through the upload route; its id."""
    reply = api.client.post(UPLOAD, files={"file": (name, data, "image/png")})
    assert reply.status_code == 201, reply.text
    return reply.json()["id"]


def pixels_of(image: dict[str, Any]) -> np.ndarray:
    """The decoded pixels of an image in a reply (its base64)."""
    with Image.open(io.BytesIO(base64.b64decode(image["base64"]))) as decoded:
        return np.asarray(decoded.convert("RGB")).astype(np.int16)


def generate(api: ApiHarness, **body: Any) -> dict[str, Any]:
    """POST a sync generation; assert the 200 and return the reply."""
    reply = api.client.post(GENERATE, json={"character_description": SCENE, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def readiness(api: ApiHarness) -> dict[str, Any]:
    """/ready's reply once the local model has loaded (and says what it takes)."""
    wait_until(lambda: api.client.get("/ready").json()["reference_images"]["local"] is not None)
    return api.client.get("/ready").json()


def stored_generations(api: ApiHarness) -> list[str]:
    """Keys of every stored generation record."""
    return list(api.client.app.state.assets.storage.list_keys("generations/"))


@pytest.fixture
def klein_api(make_api: Callable[..., ApiHarness], tiny_klein: Path) -> Callable[..., ApiHarness]:
    """Apps on the tiny klein pipeline (local generator only), in local or S3 mode."""

    def factory(mode: str = "local", **overrides: Any) -> ApiHarness:
        overrides.setdefault("image_generator", "local")
        return make_api(mode, local_model_id=str(tiny_klein), **overrides)

    return factory


# --------------------------------------------------------------- the request


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"reference_image_ids": []}, "reference_image_ids"),
        ({"reference_image_ids": [str(uuid.uuid4()) for _ in range(5)]}, "reference_image_ids"),
        ({"reference_image_ids": ["../etc/passwd"]}, "reference_image_ids"),
        (
            {"reference_image_ids": ["6f1c1d3e-0000-4000-8000-000000000001"] * 2},
            "reference_image_ids",
        ),
        ({"reference_image_ids": "6f1c1d3e-0000-4000-8000-000000000001"}, "reference_image_ids"),
        ({"views": []}, "views"),
        ({"views": ["front"] * 9}, "views"),
        ({"views": ["sideways"]}, "views"),
        ({"views": "everything"}, "views"),
        ({"views": ["front"], "num_images": 2}, "num_images"),
        ({"num_images": 5}, "num_images"),
    ],
)
def test_bad_reference_input_is_a_422_naming_the_field(
    make_api: Callable[..., ApiHarness], extra: dict[str, Any], field: str
) -> None:
    api, blocking = _blocking(make_api)
    for route in (GENERATE, JOBS):
        reply = api.client.post(route, json={"character_description": SCENE, **extra})
        assert reply.status_code == 422, reply.text
        fields = assert_error_shape(reply.json(), "ValidationError")["fields"]
        assert any(field in problem["loc"] for problem in fields), fields
    assert blocking.calls == 0


def test_prompts_keep_the_character_and_say_the_view() -> None:
    one = build_prompt(SCENE, None, 1)
    assert one.startswith(SCENE + ".")  # what changes between requests comes first
    assert "reference image:" in one and "outfit" in one
    several = build_prompt(SCENE, "back", 3)
    assert "3 reference images (the first shows its identity)" in several
    assert VIEW_PROMPTS["back"] in several
    assert VIEW_PROMPTS["side"] in build_prompt("a fox", "side")  # views without references
    assert build_prompt("a fox") == build_prompt("a fox", None, 0)


def test_a_reference_is_checked_like_an_upload_and_scaled_to_a_megapixel() -> None:
    large = photo_like_png(2048, 1024)
    fitted = fit_to_area(large, MAX_REFERENCE_PIXELS)
    with Image.open(io.BytesIO(fitted)) as image:
        assert image.width * image.height <= MAX_REFERENCE_PIXELS
        assert abs(image.width / image.height - 2.0) < 0.01
    small = blocks_png(1)
    assert fit_to_area(small, MAX_REFERENCE_PIXELS) is small
    with pytest.raises(UnsupportedImageError):
        fit_to_area(small[: len(small) // 2], MAX_REFERENCE_PIXELS)
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, format="PNG")
    with pytest.raises(UnsupportedImageError, match="too many pixels"):
        fit_to_area(bomb.getvalue(), MAX_REFERENCE_PIXELS)


def test_references_travel_to_the_worker_tier_whole() -> None:
    request = GenerationRequest(
        ("front prompt", "side prompt"),
        (3, 4),
        "1:1",
        references=(ReferenceImage("a", blocks_png(1)), ReferenceImage("b", blocks_png(2))),
    )
    wire = json.loads(json.dumps(WorkerGenerateRequest.of(request).model_dump(mode="json")))
    assert WorkerGenerateRequest.model_validate(wire).generation_request() == request


# ------------------------------------------------------- unknown references


@pytest.mark.parametrize("route", [GENERATE, JOBS])
def test_an_unknown_or_deleted_reference_is_a_404_naming_it_with_nothing_queued(
    make_api: Callable[..., ApiHarness], route: str
) -> None:
    api, blocking = _blocking(make_api)
    kept = upload(api, blocks_png(1))
    deleted = upload(api, blocks_png(2))
    assert api.client.delete(f"/api/mv/character_references/{deleted}").status_code == 204
    for missing in (str(uuid.uuid4()), deleted):
        body = {"character_description": SCENE, "reference_image_ids": [kept, missing]}
        reply = api.client.post(route, json=body, headers={"Idempotency-Key": missing})
        assert reply.status_code == 404, reply.text
        assert missing in assert_error_shape(reply.json(), "NotFound")["message"]
    assert blocking.calls == 0
    assert stored_generations(api) == []


def test_a_reference_deleted_while_queued_fails_the_generation_with_404(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = _blocking(make_api)
    reference = upload(api, blocks_png(1))
    running = api.client.post(JOBS, json={"character_description": "a", "num_images": 1})
    blocking.started.wait(10)
    body = {"character_description": SCENE, "reference_image_ids": [reference], "num_images": 1}
    queued = api.client.post(JOBS, json=body).json()
    assert api.client.delete(f"/api/mv/character_references/{reference}").status_code == 204
    blocking.release.set()
    status = _wait(api, queued["status_url"])
    assert status["status"] == "failed"
    assert status["error"]["status_code"] == 404
    assert reference in status["error"]["message"]
    assert _wait(api, running.json()["status_url"])["status"] == "succeeded"


# ------------------------------------------------------- the local pipeline


def test_the_reference_reaches_the_pipeline(klein_api: Callable[..., ApiHarness]) -> None:
    api = klein_api(debug_endpoints=True)
    first, second = upload(api, blocks_png(1)), upload(api, blocks_png(2))
    body = {"num_images": 1, "seed": 7}
    with_first = pixels_of(generate(api, reference_image_ids=[first], **body)["images"][0])
    again = pixels_of(generate(api, reference_image_ids=[first], **body)["images"][0])
    with_second = pixels_of(generate(api, reference_image_ids=[second], **body)["images"][0])
    assert np.array_equal(with_first, again)  # the same reference: the same pixels
    assert np.abs(with_first - with_second).mean() > 2.0  # another: many levels apart
    # The second of two references reaches it too, and so does the description.
    both = pixels_of(generate(api, reference_image_ids=[first, second], **body)["images"][0])
    swapped = generate(api, reference_image_ids=[first, upload(api, blocks_png(3))], **body)
    assert np.abs(both - pixels_of(swapped["images"][0])).mean() > 2.0
    other_scene = generate(
        api, character_description="the same character asleep", reference_image_ids=[first], **body
    )
    assert np.abs(with_first - pixels_of(other_scene["images"][0])).mean() > 2.0
    debug = api.client.get("/api/mv/config/debug").json()
    assert debug["generation"]["generators"]["local"]["max_references"] == 4
    assert debug["replicate_reference_model"] == "black-forest-labs/flux-2-klein-4b"


def test_views_make_a_turnaround_sheet_each_image_as_made_alone(
    klein_api: Callable[..., ApiHarness],
) -> None:
    api = klein_api()
    reference = upload(api, blocks_png(1))
    sheet = generate(api, reference_image_ids=[reference], views="turnaround", seed=40)
    assert [image["view"] for image in sheet["images"]] == list(TURNAROUND)
    assert [image["seed"] for image in sheet["images"]] == [40, 41, 42, 43]
    parameters = sheet["metadata"]["parameters_used"]
    assert parameters["views"] == list(TURNAROUND)
    assert parameters["batch_images"] == 4 and parameters["reference_images"] == 1
    prompts = zip(TURNAROUND, parameters["prompts"], strict=True)
    assert all(VIEW_PROMPTS[view] in prompt for view, prompt in prompts)
    assert sheet["metadata"]["num_images_requested"] == 4
    assert sheet["metadata"]["reference_image_ids"] == [reference]
    side_alone = generate(api, reference_image_ids=[reference], views=["side"], seed=42)
    difference = np.abs(pixels_of(sheet["images"][2]) - pixels_of(side_alone["images"][0]))
    assert difference.max() <= 1
    # Each view has its own prompt: the same seed with another view is another picture.
    back = generate(api, reference_image_ids=[reference], views=["back"], seed=42)
    assert np.abs(pixels_of(back["images"][0]) - pixels_of(side_alone["images"][0])).mean() > 2


@pytest.mark.parametrize("mode", ["local", "s3"])
def test_lineage_is_in_the_sidecar_and_survives_deleting_the_reference(
    klein_api: Callable[..., ApiHarness], mode: str
) -> None:
    api = klein_api(mode)
    reference = upload(api, blocks_png(1))
    made = generate(
        api, reference_image_ids=[reference], views=["close_up", "smiling"], include_base64=False
    )
    image = made["images"][1]
    metadata = api.client.get(f"/api/mv/character_references/{image['id']}/metadata").json()
    assert metadata["reference_image_ids"] == [reference]
    assert metadata["view"] == "smiling"
    assert VIEW_PROMPTS["smiling"] in metadata["prompt"]
    assert api.client.delete(f"/api/mv/character_references/{reference}").status_code == 204
    served = api.fetch(image["url"])
    assert served.status_code == 200 and served.content[:8] == b"\x89PNG\r\n\x1a\n"
    after = api.client.get(f"/api/mv/character_references/{image['id']}/metadata").json()
    assert after["reference_image_ids"] == [reference]


def test_a_large_reference_reaches_the_generator_scaled_to_a_megapixel(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = _blocking(make_api)
    blocking.release.set()
    reference = upload(api, photo_like_png(2048, 1536))
    generate(api, reference_image_ids=[reference], num_images=1)
    (sent,) = blocking.requests[0].references
    with Image.open(io.BytesIO(sent.data)) as image:
        assert image.width * image.height <= MAX_REFERENCE_PIXELS
        assert (image.width, image.height) == (1182, 886)
    assert sent.id == reference


def test_images_made_from_a_reference_can_go_straight_into_a_job(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = _blocking(make_api)
    blocking.release.set()
    reference = upload(api, blocks_png(1))
    assert api.client.post("/api/mv/jobs", json={"job_id": "video-7"}).status_code == 201
    made = generate(api, reference_image_ids=[reference], views=["front", "side"], job_id="video-7")
    job = api.client.get("/api/mv/jobs/video-7").json()
    in_job = sorted(asset["image_id"] for asset in job["assets"])
    assert in_job == sorted(image["id"] for image in made["images"])
    missing_job = {"character_description": SCENE, "reference_image_ids": [reference]}
    reply = api.client.post(GENERATE, json={**missing_job, "job_id": "no-such-job"})
    assert reply.status_code == 404


# ------------------------------------------- models that take no references


def test_a_model_without_references_answers_422_naming_the_field_and_setting(
    make_api: Callable[..., ApiHarness],
) -> None:
    api = make_api(image_generator="local")  # the tiny SDXL-Turbo: text to image only
    reference = upload(api, blocks_png(1))
    assert readiness(api)["reference_images"] == {"local": 0}
    body = {"character_description": SCENE, "reference_image_ids": [reference], "num_images": 1}
    for route in (GENERATE, JOBS):
        reply = api.client.post(route, json=body)
        assert reply.status_code == 422, reply.text
        detail = assert_error_shape(reply.json(), "ValidationError")
        assert detail["fields"][0]["loc"] == ["body", "reference_image_ids"]
        assert "LOCAL_MODEL_ID=black-forest-labs/FLUX.2-klein-4B" in detail["message"]
    assert stored_generations(api) == []
    # Without references the same model still serves.
    assert api.client.post(GENERATE, json={**body, "reference_image_ids": None}).status_code == 200


def test_in_auto_a_reference_request_goes_to_the_next_generator_that_takes_it(
    make_api: Callable[..., ApiHarness],
) -> None:
    fake = FakeReplicate()
    api = make_api(replicate=fake)  # local: the tiny SDXL-Turbo; then Replicate
    reference = upload(api, blocks_png(1))
    assert readiness(api)["reference_images"] == {"local": 0, "replicate": 4}
    reply = generate(api, reference_image_ids=[reference], num_images=1)
    assert reply["metadata"]["backend"] == "replicate"
    assert "local: the model" in reply["metadata"]["fallback_reason"]
    assert "takes no reference images" in reply["metadata"]["fallback_reason"]
    assert fake.models == [KLEIN_REPLICATE]
    # A text-only request still runs locally.
    assert generate(api, num_images=1)["metadata"]["backend"] == "local"


def test_flux_kontext_takes_one_reference_at_the_size_asked_for(
    make_api: Callable[..., ApiHarness], tmp_path_factory: pytest.TempPathFactory
) -> None:
    from tools.make_tiny_model import build

    kontext = build(tmp_path_factory.mktemp("models") / "tiny-flux-kontext", "flux-kontext")
    api = make_api(image_generator="local", local_model_id=str(kontext))
    first, second = upload(api, blocks_png(1)), upload(api, blocks_png(2))
    assert readiness(api)["reference_images"] == {"local": 1}
    # Kontext's own defaults would make 1584x656 here (its max_area) from a reference resized
    # to its preferred bucket; the size asked for is the size made.
    reply = generate(api, reference_image_ids=[first], num_images=1, aspect_ratio="21:9")
    image = reply["images"][0]
    assert (image["width"], image["height"]) == (1536, 640)
    assert reply["metadata"]["parameters_used"]["family"] == "flux-kontext"
    two = {"character_description": SCENE, "reference_image_ids": [first, second]}
    refused = api.client.post(GENERATE, json=two)
    assert refused.status_code == 422
    assert "at most 1 reference image(s), not 2" in refused.json()["detail"]["message"]


# ---------------------------------------------------------------- Replicate


def test_replicate_uploads_each_reference_once_in_local_mode(
    make_api: Callable[..., ApiHarness],
) -> None:
    fake = FakeReplicate()
    api = make_api(replicate=fake, image_generator="replicate")
    first, second = upload(api, blocks_png(1)), upload(api, blocks_png(2))
    reply = generate(api, reference_image_ids=[first, second], views=["front", "back"], seed=3)
    assert reply["metadata"]["model_used"] == KLEIN_REPLICATE
    assert fake.models == [KLEIN_REPLICATE] * 2
    assert len(fake.files) == 2  # one upload per reference, shared by both predictions
    uploaded = list(fake.files)
    by_seed = {inputs["seed"]: inputs for inputs in fake.inputs}
    assert by_seed[3]["images"] == uploaded and by_seed[4]["images"] == uploaded
    assert VIEW_PROMPTS["front"] in by_seed[3]["prompt"]
    assert VIEW_PROMPTS["back"] in by_seed[4]["prompt"]
    names = sorted(name for name, _, _ in fake.files.values())
    assert names == sorted([f"{first}.png", f"{second}.png"])
    assert {data for _, _, data in fake.files.values()} == {blocks_png(1), blocks_png(2)}


def test_replicate_gets_presigned_urls_in_s3_mode(make_api: Callable[..., ApiHarness]) -> None:
    fake = FakeReplicate()
    api = make_api("s3", replicate=fake, image_generator="replicate")
    reference = upload(api, blocks_png(1))
    generate(api, reference_image_ids=[reference], num_images=1)
    assert fake.files == {}
    (url,) = fake.inputs[0]["images"]
    assert f"character_references/{reference}.png" in url and "X-Amz-Signature=" in url
    assert api.fetch(url).content == blocks_png(1)


def test_replicate_kontext_takes_one_input_image(make_api: Callable[..., ApiHarness]) -> None:
    kontext = "black-forest-labs/flux-kontext-pro"
    fake = FakeReplicate(other_models=(kontext,))
    api = make_api(replicate=fake, image_generator="replicate", replicate_reference_model=kontext)
    first, second = upload(api, blocks_png(1)), upload(api, blocks_png(2))
    generate(api, reference_image_ids=[first], num_images=1, output_format="webp")
    inputs = fake.inputs[0]
    assert inputs["input_image"] == next(iter(fake.files)) and "images" not in inputs
    assert inputs["output_format"] == "jpg"  # what Kontext offers; stored as WebP
    two = {"character_description": SCENE, "reference_image_ids": [first, second]}
    reply = api.client.post(GENERATE, json=two)
    assert reply.status_code == 422
    assert "REPLICATE_REFERENCE_MODEL" in reply.json()["detail"]["message"]


# ------------------------------------------- async, idempotency, webhooks


def test_async_references_with_idempotency_cancel_and_webhook(
    make_api: Callable[..., ApiHarness],
) -> None:
    api, blocking = _blocking(make_api)
    reference = upload(api, blocks_png(1))
    body = {"character_description": SCENE, "reference_image_ids": [reference], "views": ["side"]}
    key = {"Idempotency-Key": "sheet-1"}
    first = api.client.post(JOBS, json=body, headers=key).json()
    assert (
        api.client.post(JOBS, json=body, headers=key).json()["generation_id"]
        == (first["generation_id"])
    )
    other = api.client.post(
        JOBS, json={**body, "reference_image_ids": [upload(api, blocks_png(2))]}, headers=key
    )
    assert other.status_code == 422  # the key names another request
    blocking.started.wait(10)
    canceled = api.client.delete(first["status_url"]).json()
    assert _wait(api, first["status_url"])["status"] == "canceled", canceled
    blocking.release.set()
    with webhook_receiver() as receiver:
        status = api.client.post(JOBS, json={**body, "webhook_url": receiver.url}).json()
        (delivery,) = receiver.wait_for(1)
    event = json.loads(delivery.body)["data"]
    assert event["generation_id"] == status["generation_id"]
    result = event["result"]
    assert result["metadata"]["reference_image_ids"] == [reference]
    assert [image["view"] for image in result["images"]] == ["side"]
    assert blocking.requests[-1].reference_ids == (reference,)


def _blocking(make_api: Callable[..., ApiHarness]) -> tuple[ApiHarness, BlockingGenerator]:
    blocking = BlockingGenerator()
    return make_api(image_generator="replicate", generators={"replicate": blocking}), blocking


def _wait(api: ApiHarness, status_url: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = api.client.get(status_url).json()
        if status["status"] in ("succeeded", "failed", "canceled"):
            return status
        time.sleep(0.02)
    pytest.fail(f"{status_url} did not finish: {status}")


def test_klein_is_the_default_and_replicate_follows_the_local_family(
    make_settings: Callable[..., Settings],
) -> None:
    assert Settings.model_fields["local_model_id"].default == "black-forest-labs/FLUX.2-klein-4B"
    follows = {"replicate_model": ""}  # .env.test names one
    klein = make_settings(**follows, local_model_id="black-forest-labs/FLUX.2-klein-4B")
    assert klein.effective_replicate_model == KLEIN_REPLICATE
    schnell = make_settings(**follows, local_model_id="black-forest-labs/FLUX.1-schnell")
    assert schnell.effective_replicate_model == "black-forest-labs/flux-schnell"
    chosen = make_settings(replicate_model="someone/their-model")
    assert chosen.effective_replicate_model == "someone/their-model"
    assert klein.replicate_reference_model == KLEIN_REPLICATE
