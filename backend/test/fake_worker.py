"""A fake worker-tier HTTP layer for the real WorkerGenerator, for replies a real worker
cannot be made to send (a truncated stream, an unreadable event, images for other seeds).

It is an `httpx.MockTransport`: the client's requests, streaming and parsing run for real;
only the network and the worker are replaced. The normal paths run against the real worker
app on Ray (test_worker_tier.py). `PacedWorker` serves the same protocol over real HTTP, at a
chosen pace, for API processes started by the tests.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from fake_replicate import png_bytes
from services.generation.worker_protocol import (
    STREAM_MEDIA_TYPE,
    TOKEN_HEADER,
    Accepted,
    Done,
    EncodedImage,
    Progress,
    WorkerEvent,
    encode_event,
)

TOKEN = "fake-worker-token-0123"


def stream(*events: WorkerEvent | bytes, status: int = 200) -> httpx.Response:
    """A 200 reply streaming `events` (raw bytes are sent as they are)."""
    body = b"".join(e if isinstance(e, bytes) else encode_event(e) for e in events)
    return httpx.Response(status, headers={"content-type": STREAM_MEDIA_TYPE}, content=body)


def good_events(body: dict, total_steps: int = 4) -> list[WorkerEvent]:
    """What a worker sends for `body`: accepted, every step, one PNG per seed, done."""
    events: list[WorkerEvent] = [Accepted(replica="fake-replica")]
    events += [Progress(step=s, total_steps=total_steps) for s in range(1, total_steps + 1)]
    events += [EncodedImage(seed, "image/png", png_bytes(seed)) for seed in body["seeds"]]
    events.append(Done(model="fake/model", parameters={"batch_images": len(body["seeds"])}))
    return events


@dataclass
class FakeWorker:
    """Scriptable: /ready's status, and replies to /generate consumed in order (then good)."""

    token: str = TOKEN
    ready_status: int = 200
    replies: list[Callable[[dict], httpx.Response]] = field(default_factory=list)
    generate_calls: int = 0

    def transport(self) -> httpx.MockTransport:
        """The transport to hand to the generator."""
        return httpx.MockTransport(self._handle)

    def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.headers.get(TOKEN_HEADER) != self.token:
            return httpx.Response(401, json={"detail": {"error": "Unauthorized", "message": "x"}})
        if request.url.path.endswith("/ready"):
            if self.ready_status != 200:
                detail = {"error": "NotReady", "message": "no worker replica answered"}
                return httpx.Response(self.ready_status, json={"detail": detail})
            return httpx.Response(200, json={"status": "ready", "model": "fake/model"})
        self.generate_calls += 1
        body = json.loads(request.content)
        if self.replies:
            return self.replies.pop(0)(body)
        return stream(*good_events(body))


@dataclass
class PacedWorker:
    """A worker tier over real HTTP whose generations take `steps` x `step_seconds`.

    For API processes that need a generation running long enough to be seen and canceled
    from elsewhere; it counts the generations it was asked for and those whose caller
    closed the stream before the end (a cancel).
    """

    token: str = TOKEN
    steps: int = 4
    step_seconds: float = 0.02
    generate_calls: int = 0
    finished: int = 0
    closed_early: int = 0

    def app(self) -> Starlette:
        """The ASGI app to serve (live_server.serve)."""
        return Starlette(
            routes=[
                Route("/ready", self._ready),
                Route("/generate", self._generate, methods=["POST"]),
            ]
        )

    async def _ready(self, request: Request) -> Response:
        if request.headers.get(TOKEN_HEADER) != self.token:
            return JSONResponse({"detail": {"error": "Unauthorized", "message": "x"}}, 401)
        return JSONResponse({"status": "ready", "model": "paced/model"})

    async def _generate(self, request: Request) -> Response:
        if request.headers.get(TOKEN_HEADER) != self.token:
            return JSONResponse({"detail": {"error": "Unauthorized", "message": "x"}}, 401)
        body = await request.json()
        self.generate_calls += 1
        steps, step_seconds = self.steps, self.step_seconds

        async def events() -> AsyncIterator[bytes]:
            completed = False
            try:
                yield encode_event(Accepted(replica="paced-replica"))
                for step in range(1, steps + 1):
                    await asyncio.sleep(step_seconds)
                    yield encode_event(Progress(step=step, total_steps=steps))
                for seed in body["seeds"]:
                    yield encode_event(EncodedImage(seed, "image/png", png_bytes(seed)))
                yield encode_event(Done(model="paced/model", parameters={}))
                completed = True
            finally:
                if completed:
                    self.finished += 1
                else:
                    self.closed_early += 1

        return StreamingResponse(events(), media_type=STREAM_MEDIA_TYPE)
