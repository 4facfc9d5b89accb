"""A fake Replicate HTTP layer (API and delivery CDN) for the real `replicate` client.

It is an `httpx.MockTransport`: the client, its request building, response parsing and
polling all run for real; only the network and Replicate's servers are replaced.
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image

DELIVERY = "https://replicate.delivery/xezq"


def png_bytes(seed: int, size: tuple[int, int] = (64, 48), image_format: str = "PNG") -> bytes:
    """A small image whose colour encodes `seed`."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed % 256, (seed * 7) % 256, 99)).save(buffer, format=image_format)
    return buffer.getvalue()


@dataclass
class FakeReplicate:
    """Scriptable behaviour: queue replies for prediction POSTs, serve outputs by URL."""

    model: str = "black-forest-labs/flux-schnell"
    # Models that also answer (the reference model, for one).
    other_models: tuple[str, ...] = ("black-forest-labs/flux-2-klein-4b",)
    # Replies to prediction creation, consumed in order; then every prediction succeeds.
    create_replies: list[httpx.Response] = field(default_factory=list)
    # Status of a new prediction: "succeeded", or "starting" to make the client poll.
    initial_status: str = "succeeded"
    final_status: str = "succeeded"
    # Output bytes per seed; default: a PNG.
    output_for: Callable[[int], bytes] = png_bytes
    output_url_for: Callable[[str], str] = lambda name: f"{DELIVERY}/{name}/out-0.png"
    requests: list[httpx.Request] = field(default_factory=list)
    inputs: list[dict[str, Any]] = field(default_factory=list)
    # The model of each prediction, in the order of `inputs`.
    models: list[str] = field(default_factory=list)
    # Files uploaded through the file API: URL -> (filename, content type, bytes).
    files: dict[str, tuple[str, str, bytes]] = field(default_factory=dict)
    outputs: dict[str, bytes] = field(default_factory=dict)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    delivery_replies: list[httpx.Response] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        """The transport to hand to the generator."""
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        path = request.url.path
        if (
            request.method == "POST"
            and path.startswith("/v1/models/")
            and path.endswith("/predictions")
        ):
            return self._create(request, path.removeprefix("/v1/models/").rsplit("/", 1)[0])
        if request.method == "POST" and path == "/v1/files":
            return self._upload(request)
        if request.method == "GET" and request.url.path.startswith("/v1/predictions/"):
            prediction = self.predictions[request.url.path.rsplit("/", 1)[1]]
            prediction["status"] = self.final_status
            if self.final_status == "failed":
                prediction["error"] = "CUDA error on the provider"
                prediction["output"] = None
            return httpx.Response(200, json=prediction)
        if url in self.outputs or request.url.host != "api.replicate.com":
            if self.delivery_replies:
                return self.delivery_replies.pop(0)
            if url not in self.outputs:
                return httpx.Response(404)
            return httpx.Response(200, content=self.outputs[url])
        return httpx.Response(404, json={"detail": "not found"})

    def _upload(self, request: httpx.Request) -> httpx.Response:
        """The file API: a multipart upload, answered as Replicate does (its URL under urls.get)."""
        from email.parser import BytesParser
        from email.policy import HTTP

        head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
        message = BytesParser(policy=HTTP).parsebytes(head + request.content)
        part = next(
            p
            for p in message.iter_parts()
            if p.get_param("name", header="content-disposition") == "content"
        )
        data = part.get_payload(decode=True)
        name = uuid.uuid4().hex
        url = f"https://api.replicate.com/v1/files/{name}"
        filename = str(part.get_filename())
        self.files[url] = (filename, part.get_content_type(), data)
        return httpx.Response(
            201,
            json={
                "id": name,
                "name": filename,
                "content_type": part.get_content_type(),
                "size": len(data),
                "etag": name,
                "checksums": {},
                "metadata": {},
                "created_at": "2026-01-01T00:00:00Z",
                "expires_at": None,
                "urls": {"get": url},
            },
        )

    def _create(self, request: httpx.Request, model: str) -> httpx.Response:
        if self.create_replies:
            return self.create_replies.pop(0)
        if model != self.model and model not in self.other_models:
            return httpx.Response(404, json={"detail": f"no model {model}"})
        body = json.loads(request.content)
        self.inputs.append(body["input"])
        self.models.append(model)
        name = uuid.uuid4().hex
        output_url = self.output_url_for(name)
        self.outputs[output_url] = self.output_for(body["input"]["seed"])
        prediction = {
            "id": name,
            "model": model,
            "version": "v",
            "status": self.initial_status,
            "input": body["input"],
            "output": [output_url] if self.initial_status == "succeeded" else None,
            "logs": "",
            "error": None,
            "urls": {"get": f"https://api.replicate.com/v1/predictions/{name}"},
        }
        self.predictions[name] = {**prediction, "output": [output_url]}
        return httpx.Response(201, json=prediction)

    @property
    def prediction_posts(self) -> list[httpx.Request]:
        """Every prediction-creation request received."""
        return [r for r in self.requests if r.method == "POST" and r.url.path != "/v1/files"]
