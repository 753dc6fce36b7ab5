"""OpenAI's API: `POST /v1/chat/completions` (whole or streamed),
`GET /v1/models` and `GET /v1/models/{id}`. Errors come in OpenAI's shape
and status codes, so the official SDKs raise the exception that fits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.http import (
    MODEL,
    BodyTooLarge,
    bearer,
    budget_header,
    ignored_header,
    json_response,
    open_sse,
    read_body,
    result_headers,
    retry_after,
    sse,
    timeout_s,
    virtual_key,
)
from gateway.service import Gateway
from modelyard.openai_format import (
    STATUS,
    chat_completion,
    chunk_object,
    error_body,
    ignored_fields,
    usage_chunk,
)
from schemas.codec import InvalidMessage, decode_chat_request
from schemas.errors import ErrorKind, JobError, job_error
from schemas.jobs import CompletionJob
from schemas.results import JobResult, StreamChunk

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def error_response(
    error: JobError, headers: dict[str, str] | None = None, *, status: int | None = None
) -> web.Response:
    """A typed error in OpenAI's shape, with its status (and `retry-after`)."""
    status = status or STATUS[error.kind]
    extra = retry_after(error.retry_after_s) if status == 429 else {}
    if not error.retryable:
        extra["x-should-retry"] = "false"  # the official SDKs would retry a 429 or a 5xx
    body = error_body(error, status)
    return json_response(body, status=status, headers={**(headers or {}), **extra})


def too_large(exc: BodyTooLarge) -> web.Response:
    """413, in OpenAI's shape."""
    error = {"message": str(exc), "type": "invalid_request_error", "param": None, "code": None}
    return json_response({"error": error}, status=413)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """Run one chat completion through the pipeline."""
    gateway = request.app[GATEWAY]
    try:
        body = await read_body(request, gateway.settings.max_body_bytes)
        chat, fields = decode_chat_request(body)
    except BodyTooLarge as exc:
        return too_large(exc)
    except InvalidMessage as exc:
        return error_response(exc.to_error())
    request[MODEL] = chat.model
    secret = virtual_key(bearer(request), required=gateway.config.access.require_key)
    job = gateway.job(chat, secret, timeout_s(request, gateway.settings))
    headers = {"x-request-id": job.id}
    headers.update(ignored_header(ignored_fields(fields)))
    if chat.stream:
        return await _stream(request, gateway, job, headers)
    return await whole_answer(gateway, job, headers, chat_completion, error_response)


async def whole_answer(
    gateway: Gateway,
    job: CompletionJob,
    headers: dict[str, str],
    render: Callable[[JobResult], dict[str, Any]],
    refuse: Callable[[JobError, dict[str, str]], web.Response],
) -> web.Response:
    """Run a job that is not streamed: its answer rendered in the API's
    shape with what it cost in the headers, or its error in the API's shape."""
    answer = await gateway.complete(job)
    if isinstance(answer, JobError):
        return refuse(answer, headers)
    headers = {**headers, **budget_header(job), **result_headers(answer)}
    gateway.metrics.result(job.request.model, answer)
    if answer.error is not None:
        return refuse(answer.error, headers)
    return json_response(render(answer), headers=headers)


async def _stream(
    request: web.Request, gateway: Gateway, job: CompletionJob, headers: dict[str, str]
) -> web.StreamResponse:
    """Chunks as Server-Sent Events, ending `data: [DONE]`. An error before
    the first chunk is an ordinary error response; after it, an error event.
    A job run again after a worker died cannot take back what was sent: if
    chunks went out, the stream ends with an error event; if not, the new
    attempt is served."""
    include_usage = bool(job.request.stream_options and job.request.stream_options.include_usage)
    completion_id, created, model = f"chatcmpl-{job.id}", int(time.time()), job.request.model
    response: web.StreamResponse | None = None
    finished = False
    again = False  # serving a second attempt from its start
    async for item in gateway.stream(job):
        if isinstance(item, JobResult):
            gateway.metrics.result(model, item)
            if response is None:
                if item.error is not None:
                    return error_response(item.error, {**headers, **result_headers(item)})
                response = await open_sse(request, headers)
            if item.error is not None:
                await response.write(sse(error_body(item.error)))
                return response
            if not finished:
                closing = item.response.finish_reason if item.response else "stop"
                last = StreamChunk(job_id=job.id, seq=-1, finish_reason=closing)
                chunk = chunk_object(
                    last, completion_id=completion_id, model=model, created=created, first=False
                )
                await response.write(sse(chunk))
            if include_usage:
                await response.write(
                    sse(
                        usage_chunk(item, completion_id=completion_id, model=model, created=created)
                    )
                )
            await response.write(b"data: [DONE]\n\n")
            return response
        if item.redelivered and not again and response is not None:
            error = job_error(
                ErrorKind.SERVER_ERROR,
                "the worker running this request stopped mid-stream; "
                "what was streamed cannot be taken back: send the request again",
            )
            await response.write(sse(error_body(error)))
            return response
        again = again or item.redelivered
        first = response is None
        if response is None:
            response = await open_sse(request, headers)
        chunk = chunk_object(
            item, completion_id=completion_id, model=model, created=created, first=first
        )
        finished = finished or item.finish_reason is not None
        await response.write(sse(chunk))
    return response or web.Response(status=500)


async def _usable_models(request: web.Request) -> list[str] | JobError:
    gateway = request.app[GATEWAY]
    secret = virtual_key(bearer(request), required=gateway.config.access.require_key)
    return await gateway.dispatcher.admission.usable_models(secret)


async def list_models(request: web.Request) -> web.Response:
    """The models this key may use now."""
    models = await _usable_models(request)
    if isinstance(models, JobError):
        return error_response(models)
    return json_response({"object": "list", "data": [_model(name) for name in models]})


async def get_model(request: web.Request) -> web.Response:
    """One model this key may use; 404 for any other."""
    gateway = request.app[GATEWAY]
    models = await _usable_models(request)
    if isinstance(models, JobError):
        return error_response(models)
    name = request.match_info["model"]
    group = gateway.dispatcher.routes.resolve(name)
    if group is None or group.name not in models:
        error = job_error(
            ErrorKind.UNKNOWN_MODEL,
            f"no model named {name!r} that this key may use",
            field="$.request.model",
        )
        return error_response(error)
    return json_response(_model(name))


def _model(name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "modelyard"}
