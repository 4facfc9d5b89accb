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
    outputs: dict[str, bytes] = field(default_factory=dict)
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    delivery_replies: list[httpx.Response] = field(default_factory=list)

    def transport(self) -> httpx.MockTransport:
        """The transport to hand to the generator."""
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        url = str(request.url)
        if request.method == "POST" and request.url.path == f"/v1/models/{self.model}/predictions":
            return self._create(request)
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

    def _create(self, request: httpx.Request) -> httpx.Response:
        if self.create_replies:
            return self.create_replies.pop(0)
        body = json.loads(request.content)
        self.inputs.append(body["input"])
        name = uuid.uuid4().hex
        output_url = self.output_url_for(name)
        self.outputs[output_url] = self.output_for(body["input"]["seed"])
        prediction = {
            "id": name,
            "model": self.model,
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
        return [r for r in self.requests if r.method == "POST"]
