"""The OpenAPI document: one for every configuration, with what generated clients need (binary
bodies, headers, typed ids, one error reply with a closed list of names, security schemes).

The contract tests (test_contract.py) generate clients from it and run them; the fuzzing
(test_fuzz.py) checks every reply against it. These check the document's own promises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config import Settings
from conftest import TEST_SIGNING_SECRET
from main import create_app
from mv.errors import ERROR_NAMES
from routers.errors.handlers import _HTTP_ERROR_NAMES, _STATUS

SERVED_FILE_OPERATIONS = {
    "getCharacterReference",
    "getCharacterReferenceThumbnail",
    "getJobCharacterReference",
    "getJobCharacterReferenceThumbnail",
    "getJobAsset",
}


def operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(method, path, operation) of every operation."""
    for path, item in document["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def by_id(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {operation["operationId"]: operation for _, _, operation in operations(document)}


@pytest.fixture
def document(make_settings: Callable[..., Settings]) -> dict[str, Any]:
    return create_app(make_settings()).openapi()


@pytest.mark.parametrize(
    "configuration",
    [
        {"api_keys": "k-0123456789abcdef", "url_signing_secret": TEST_SIGNING_SECRET},
        {"storage_backend": "s3", "storage_bucket": "bucket", "serve_from_cloud": True},
        {"debug_endpoints": True},
        {"public_base_url": "https://api.example.test"},
        {"image_generator": "replicate", "replicate_api_token": "r8_test-token"},
    ],
    ids=["api keys", "cloud serving", "debug endpoints", "public base url", "replicate"],
)
def test_the_document_is_the_same_whatever_the_configuration(
    make_settings: Callable[..., Settings],
    document: dict[str, Any],
    configuration: dict[str, Any],
) -> None:
    assert create_app(make_settings(**configuration)).openapi() == document


def test_servers_name_the_public_base_url_or_the_requests_own_base(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/openapi.json").json()["servers"] == [{"url": "http://testserver"}]
    public = make_settings(public_base_url="https://api.example.test")
    with TestClient(create_app(public)) as client:
        served = client.get("/openapi.json").json()
    assert served["servers"] == [{"url": "https://api.example.test"}]
    assert served["info"]["license"]["identifier"] and served["info"]["contact"]["name"]
    described = {tag["name"] for tag in served["tags"] if tag["description"]}
    used = {tag for _, _, operation in operations(served) for tag in operation["tags"]}
    assert used <= described


def test_operation_ids_are_short_camel_case_names(document: dict[str, Any]) -> None:
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z][a-zA-Z]{2,40}", name) for name in ids), ids
    assert {"generateCharacterReference", "uploadCharacterReference", "createJob"} <= set(ids)
    assert set(ids) >= SERVED_FILE_OPERATIONS


def test_every_error_is_the_one_reply_with_a_closed_list_of_names(
    document: dict[str, Any],
) -> None:
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas
    detail = schemas["ErrorReply"]["properties"]["detail"]
    assert detail["discriminator"]["propertyName"] == "error"
    names = set(schemas["ServiceErrorDetail"]["properties"]["error"]["enum"])
    assert names | {schemas["ValidationErrorDetail"]["properties"]["error"]["const"]} == (
        ERROR_NAMES
    )
    assert set(detail["discriminator"]["mapping"]) == ERROR_NAMES
    for name in ("ErrorReply", "ServiceErrorDetail", "ValidationErrorDetail", "FieldProblem"):
        assert schemas[name]["additionalProperties"] is False, name
    assert "fields" not in schemas["ServiceErrorDetail"]["properties"]
    assert "fields" in schemas["ValidationErrorDetail"]["required"]
    declared = 0
    for method, path, operation in operations(document):
        statuses = operation["responses"]
        assert "500" in statuses, (method, path)
        if "requestBody" in operation:
            assert "413" in statuses, (method, path)
        for status, response in statuses.items():
            if status[0] not in "45" or (path, status) == ("/ready", "503"):
                continue
            schema = response["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorReply"}, (method, path, status)
            declared += 1
    assert declared > 100


def test_every_name_the_server_maps_an_error_to_is_declared() -> None:
    mapped = {name for _, _, name in _STATUS} | set(_HTTP_ERROR_NAMES.values())
    assert mapped <= ERROR_NAMES


def test_security_is_declared_on_every_operation(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "in": "header", "name": "X-API-Key"}
    assert schemes["SignedUrl"]["in"] == "query"
    assert schemes["BearerAuth"] == {**schemes["BearerAuth"], "type": "http", "scheme": "bearer"}
    for _, path, operation in operations(document):
        parameters = {parameter["name"] for parameter in operation.get("parameters", [])}
        if not path.startswith("/api/"):
            assert operation["security"] == []
        elif operation["operationId"] in SERVED_FILE_OPERATIONS:
            assert operation["security"] == [{"ApiKey": []}, {"BearerAuth": []}, {"SignedUrl": []}]
            assert {"expires", "signature", "If-None-Match", "Range"} <= parameters
            assert {"401", "403"} <= set(operation["responses"])
        elif operation["operationId"] == "streamCharacterReferenceJobEvents":
            # A browser EventSource sends no headers: it opens the signed events_url.
            assert operation["security"] == [{"ApiKey": []}, {"BearerAuth": []}, {"SignedUrl": []}]
            assert {"expires", "signature", "Last-Event-ID"} <= parameters
            assert {"401", "403"} <= set(operation["responses"])
        else:
            assert operation["security"] == [{"ApiKey": []}, {"BearerAuth": []}]
            assert "signature" not in parameters
            assert {"401", "503"} <= set(operation["responses"])


def test_served_files_declare_binary_bodies_redirects_and_their_headers(
    document: dict[str, Any],
) -> None:
    binary = {"schema": {"type": "string", "format": "binary"}}
    for name in SERVED_FILE_OPERATIONS:
        replies = by_id(document)[name]["responses"]
        ok = replies["200"]["content"]
        assert all(ok[media] == binary for media in ok if media != "application/json"), name
        assert "Content-Range" in replies["206"]["headers"]
        assert replies["304"]["headers"]["ETag"]["required"] is True
        assert replies["307"]["headers"]["Location"]["required"] is True
        assert "416" in replies
    image = by_id(document)["getCharacterReference"]["responses"]["200"]["content"]
    assert set(image) == {"image/png", "image/jpeg", "image/webp", "application/json"}
    assert image["application/json"]["schema"]["$ref"].endswith("/CloudImageLocation")
    asset = by_id(document)["getJobAsset"]["responses"]["200"]["content"]
    assert asset["application/json"]["schema"]["$ref"].endswith("/CloudAssetLocation")
    thumbnail = by_id(document)["getCharacterReferenceThumbnail"]["responses"]["200"]
    assert set(thumbnail["content"]) == {"image/webp"}


def test_headers_are_declared_where_they_are_sent(document: dict[str, Any]) -> None:
    ops = by_id(document)
    generated = ops["generateCharacterReference"]["responses"]
    assert generated["200"]["headers"]["X-Generation-Id"]["required"] is True
    assert generated["429"]["headers"]["Retry-After"]["required"] is True
    assert ops["createJob"]["responses"]["201"]["headers"]["Location"]["required"] is True
    submitted = ops["submitCharacterReferenceJob"]["responses"]
    assert submitted["202"]["headers"]["Location"]["required"] is True
    canceled = ops["cancelCharacterReferenceJob"]["responses"]["202"]
    assert canceled["content"]["application/json"]["schema"]["$ref"].endswith("/GenerationStatus")
    unauthorized = ops["getJob"]["responses"]["401"]["headers"]
    assert unauthorized["WWW-Authenticate"]["required"] is True
    for method, path, operation in operations(document):
        for status, response in operation["responses"].items():
            assert "X-Request-ID" in response["headers"], (method, path, status)


def test_ids_are_typed(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    job_id = {"pattern": r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"}
    for model, field in [("CharacterReferenceImage", "id"), ("UploadedCharacterReference", "id")]:
        assert schemas[model]["properties"][field]["format"] == "uuid"
    assert schemas["GenerationStatus"]["properties"]["generation_id"]["format"] == "uuid"
    assert schemas["Job"]["properties"]["job_id"].items() >= job_id.items()
    request = schemas["GenerateCharacterReferenceRequest"]["properties"]
    assert request["job_id"]["anyOf"][0].items() >= job_id.items()
    assert request["reference_image_ids"]["anyOf"][0]["items"]["format"] == "uuid"
    attach = schemas["AttachCharacterReferencesRequest"]["properties"]["image_ids"]
    assert attach["items"]["format"] == "uuid"
    for _, path, operation in operations(document):
        for parameter in operation.get("parameters", []):
            if parameter["name"] in ("image_id", "generation_id"):
                assert parameter["schema"]["format"] == "uuid", path
            if parameter["name"] == "job_id":
                assert parameter["schema"]["pattern"] == job_id["pattern"], path
            if not parameter["required"]:
                assert "anyOf" not in parameter["schema"], (path, parameter["name"])


def test_every_field_of_a_reply_is_required(document: dict[str, Any]) -> None:
    """Replies send every field: a generated client types none of them as optional."""
    schemas = document["components"]["schemas"]
    replies: set[str] = set()

    def collect(schema: Any) -> None:
        if isinstance(schema, dict):
            ref = schema.get("$ref", "").rpartition("/")[2]
            if ref and ref not in replies:
                replies.add(ref)
                collect(schemas[ref])
            for value in schema.values():
                collect(value)
        elif isinstance(schema, list):
            for value in schema:
                collect(value)

    for _, _, operation in operations(document):
        for status, response in operation["responses"].items():
            if status[0] in "23":
                collect(response.get("content", {}))
    assert {"GenerateCharacterReferenceResponse", "GenerationStatus", "Job"} <= replies
    for name in replies:
        properties = set(schemas[name].get("properties", {}))
        assert properties == set(schemas[name].get("required", [])), name
