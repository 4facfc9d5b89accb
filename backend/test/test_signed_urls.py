"""Signed local URLs: an <img src> works without X-API-Key on exactly the route it names."""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import TEST_SIGNING_SECRET, ApiHarness, assert_error_shape, image_bytes
from services.asset_persistence import SignatureCheck, UrlSigner

KEY = "signed-url-key-0123456789abcdef"
PATH = "/api/mv/get_character_reference/0b0c2a52-3c1b-4c55-9d44-0d2c6f7a9e11"


def test_a_signature_names_one_path_and_every_parameter() -> None:
    signer = UrlSigner(TEST_SIGNING_SECRET, 3600)
    url = signer.sign(PATH, {"size": "256"})
    path, _, query = url.partition("?")
    assert path == PATH
    assert signer.check(PATH, query) is SignatureCheck.VALID
    assert signer.check(PATH.replace("0b0c", "1b0c"), query) is SignatureCheck.INVALID
    assert signer.check(PATH, query.replace("size=256", "size=512")) is SignatureCheck.INVALID
    assert signer.check(PATH, query + "&redirect=true") is SignatureCheck.INVALID
    # The signature's last character changed (to "A", or to "B" when it already is an "A").
    tampered = query[:-1] + ("B" if query.endswith("A") else "A")
    assert signer.check(PATH, tampered) is SignatureCheck.INVALID
    assert signer.check(PATH, "size=256") is SignatureCheck.ABSENT
    other_secret = UrlSigner("another-secret-0123456789abcdefghijkl", 3600)
    assert other_secret.check(PATH, query) is SignatureCheck.INVALID


def test_a_signature_expires_and_keeps_most_of_its_validity() -> None:
    now = 1_800_000_000.0
    clock = [now]
    signer = UrlSigner(TEST_SIGNING_SECRET, 3600, clock=lambda: clock[0])
    url = signer.sign(PATH)
    expires = int(parse_qs(urlsplit(url).query)["expires"][0])
    assert now + 0.9 * 3600 <= expires <= now + 3600
    assert signer.sign(PATH) == url  # the same URL again for a while: caches keep working
    clock[0] = expires + 1
    assert signer.check(PATH, urlsplit(url).query) is SignatureCheck.EXPIRED


@pytest.fixture
def keyed_api(make_api: Callable[..., ApiHarness]) -> ApiHarness:
    return make_api(api_keys=KEY)


PNG = image_bytes()


def _upload(api: ApiHarness) -> dict[str, str]:
    reply = api.client.post(
        "/api/mv/upload_character_reference",
        files={"file": ("a.png", PNG)},
        headers={"X-API-Key": KEY},
    )
    assert reply.status_code == 201, reply.text
    return reply.json()


def test_a_signed_image_url_works_without_a_key(keyed_api: ApiHarness) -> None:
    image = _upload(keyed_api)
    assert "signature=" in image["url"] and "expires=" in image["url"]
    served = keyed_api.client.get(image["url"])
    assert served.status_code == 200
    assert served.content == PNG
    assert keyed_api.client.head(image["url"]).status_code == 200
    unsigned = keyed_api.client.get(image["url"].partition("?")[0])
    assert unsigned.status_code == 401


def test_a_tampered_signature_is_a_403(keyed_api: ApiHarness) -> None:
    image = _upload(keyed_api)
    tampered = image["url"][:-2] + ("AA" if not image["url"].endswith("AA") else "BB")
    reply = keyed_api.client.get(tampered)
    assert reply.status_code == 403
    assert_error_shape(reply.json(), "InvalidSignature")


def test_a_signature_for_another_route_is_a_403(keyed_api: ApiHarness) -> None:
    image = _upload(keyed_api)
    query = image["url"].partition("?")[2]
    other = keyed_api.client.get(f"/api/mv/character_references/{image['id']}/metadata?{query}")
    assert other.status_code == 403
    assert_error_shape(other.json(), "InvalidSignature")
    # A signed URL only ever reads: the same path and query with another method is refused.
    assert keyed_api.client.post(image["url"]).status_code == 403


def test_an_expired_signature_is_a_403(keyed_api: ApiHarness) -> None:
    image = _upload(keyed_api)
    path = image["url"].partition("?")[0]
    an_hour_ago = UrlSigner(TEST_SIGNING_SECRET, 60, clock=lambda: time.time() - 3600)
    reply = keyed_api.client.get(an_hour_ago.sign(path))
    assert reply.status_code == 403
    assert_error_shape(reply.json(), "SignatureExpired")


def test_job_asset_urls_are_signed_too(keyed_api: ApiHarness) -> None:
    image = _upload(keyed_api)
    headers = {"X-API-Key": KEY}
    created = keyed_api.client.post("/api/mv/jobs", json={"job_id": "signed"}, headers=headers)
    assert created.status_code == 201
    job = keyed_api.client.post(
        "/api/mv/jobs/signed/character_references",
        json={"image_ids": [image["id"]]},
        headers=headers,
    ).json()
    (asset,) = job["assets"]
    served = keyed_api.client.get(asset["url"])
    assert served.status_code == 200
    assert served.content == PNG
