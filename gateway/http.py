"""What every gateway endpoint shares: reading a request (body limit, key,
timeout), the response headers a result earns, and Server-Sent Events."""

from __future__ import annotations

import math
import re
from typing import Any

import msgspec
from aiohttp import web

from modelyard.config import GatewaySettings
from schemas.jobs import KEY_PREFIX, CompletionJob
from schemas.results import JobResult

_json = msgspec.json.Encoder(decimal_format="string")

# The model a request asked for, noted by its handler for the metrics.
MODEL: web.RequestKey[str] = web.RequestKey("model", str)
# Set once a streamed answer has started: its status line is sent.
STREAMING: web.RequestKey[bool] = web.RequestKey("streaming", bool)


class BodyTooLarge(Exception):
    """The request body is over `gateway.max_body_bytes`."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over this gateway's {limit}-byte limit")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body, refusing one over `limit` without reading it all."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    body = bytearray()
    async for piece in request.content.iter_chunked(64 * 1024):
        body += piece
        if len(body) > limit:
            raise BodyTooLarge(limit)
    return bytes(body)


def bearer(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer ...`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def virtual_key(token: str | None, *, required: bool) -> str | None:
    """The key to admit with. Where keys are optional, a token that is not a
    modelyard key (an SDK insists on some key: `sk-none`) is no key at all;
    where they are required, any token is checked (and refused if unknown)."""
    if token is None:
        return None
    return token if required or token.startswith(KEY_PREFIX) else None


def timeout_s(request: web.Request, settings: GatewaySettings) -> float:
    """How long the client will wait: the OpenAI and Anthropic SDKs say so
    (`x-stainless-timeout`, `x-stainless-read-timeout`);
    `x-modelyard-timeout` says it for anyone else. Never longer than the
    gateway's own `timeout_s`."""
    for name in ("x-modelyard-timeout", "x-stainless-timeout", "x-stainless-read-timeout"):
        try:
            asked = float(request.headers.get(name, ""))
        except ValueError:
            continue
        if math.isfinite(asked) and asked > 0:
            return min(asked, settings.timeout_s)
    return settings.timeout_s


_FIELD_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_NAMED = 20


def ignored_header(names: list[str]) -> dict[str, str]:
    """`x-modelyard-ignored` naming the request fields that were dropped.
    Only names that are plain words go in a header (a client's field name
    may hold anything, control characters included); the rest are counted."""
    if not names:
        return {}
    plain = [n for n in names if _FIELD_NAME.fullmatch(n)][:_MAX_NAMED]
    others = len(names) - len(plain)
    value = ",".join(plain + ([f"({others} more)"] if others else []))
    return {"x-modelyard-ignored": value}


def budget_header(job: CompletionJob) -> dict[str, str]:
    """`x-modelyard-budget-remaining`: the least any budget over the request
    had left once its worst case was reserved (USD); absent when none applies."""
    if job.budget_left is None:
        return {}
    return {"x-modelyard-budget-remaining": str(job.budget_left)}


def result_headers(result: JobResult) -> dict[str, str]:
    """What a finished job tells the client beyond the body."""
    headers = {"x-request-id": result.job_id}
    if result.cost is not None:
        headers["x-modelyard-cost"] = str(result.cost)
    if result.provider:
        headers["x-modelyard-provider"] = result.provider
    if result.deployment:
        headers["x-modelyard-deployment"] = result.deployment
    if result.attempts:
        headers["x-modelyard-attempts"] = str(len(result.attempts))
    return headers


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """A JSON response encoded with msgspec (Decimals as exact strings)."""
    return web.Response(
        body=_json.encode(body), status=status, headers=headers, content_type="application/json"
    )


def retry_after(seconds: float | None) -> dict[str, str]:
    """A `retry-after` header in whole seconds (at least 1)."""
    return {"retry-after": str(max(1, math.ceil(seconds or 1)))}


async def open_sse(request: web.Request, headers: dict[str, str]) -> web.StreamResponse:
    """Start a Server-Sent Events response."""
    response = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            "x-accel-buffering": "no",  # proxies must not hold the stream back
            **headers,
        }
    )
    await response.prepare(request)
    request[STREAMING] = True
    return response


def sse(data: Any, event: str | None = None) -> bytes:
    """One event: `event:` (when named) and `data:` lines."""
    payload = data if isinstance(data, bytes) else _json.encode(data)
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + payload + b"\n\n"
