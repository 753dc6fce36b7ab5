"""Anthropic's Messages API, `POST /v1/messages`, whole or streamed, routed
to any model group (whatever provider serves it). A key comes in
`x-api-key` or as a bearer token; `anthropic-version` is accepted and not
needed. Errors come in Anthropic's shape, so its SDK raises the exception
that fits."""

from __future__ import annotations

from aiohttp import web

from gateway.http import (
    MODEL,
    BodyTooLarge,
    bearer,
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
from gateway.openai_api import GATEWAY, whole_answer
from gateway.service import Gateway
from modelyard.anthropic_format import (
    MessageStream,
    decode_messages_request,
    error_body,
    job_error_body,
    message_object,
)
from modelyard.openai_format import STATUS
from schemas.codec import InvalidMessage
from schemas.errors import ErrorKind, JobError
from schemas.jobs import CompletionJob
from schemas.results import JobResult

# Anthropic answers an overloaded service with its own 529.
_OVERLOADED = 529


def error_response(error: JobError, headers: dict[str, str] | None = None) -> web.Response:
    """A typed error in Anthropic's shape, with its status (and `retry-after`)."""
    status = _OVERLOADED if error.kind == ErrorKind.OVERLOADED else STATUS[error.kind]
    extra = retry_after(error.retry_after_s) if status in (429, _OVERLOADED) else {}
    if not error.retryable:
        extra["x-should-retry"] = "false"  # the official SDK would retry a 429 or a 5xx
    body = job_error_body(status, error)
    return json_response(body, status=status, headers={**(headers or {}), **extra})


async def messages(request: web.Request) -> web.StreamResponse:
    """Run one Messages API request through the pipeline."""
    gateway = request.app[GATEWAY]
    try:
        body = await read_body(request, gateway.settings.max_body_bytes)
        chat, dropped = decode_messages_request(body)
    except BodyTooLarge as exc:
        return json_response(error_body(413, str(exc)), status=413)
    except InvalidMessage as exc:
        return error_response(exc.to_error())
    request[MODEL] = chat.model
    token = request.headers.get("x-api-key") or bearer(request)
    secret = virtual_key(token, required=gateway.config.access.require_key)
    job = gateway.job(chat, secret, timeout_s(request, gateway.settings))
    headers = {"x-request-id": job.id, "request-id": job.id}
    headers.update(ignored_header(dropped))
    if chat.stream:
        return await _stream(request, gateway, job, headers)
    return await whole_answer(gateway, job, headers, message_object, error_response)


async def _stream(
    request: web.Request, gateway: Gateway, job: CompletionJob, headers: dict[str, str]
) -> web.StreamResponse:
    """The Messages API event stream. An error before the first chunk is an
    ordinary error response; after it, an `error` event. A job run again
    after a worker died ends a stream that already sent chunks with an
    `error` event (it cannot be taken back)."""
    events = MessageStream(job.id, job.request.model)
    response: web.StreamResponse | None = None
    again = False  # serving a second attempt from its start
    async for item in gateway.stream(job):
        if response is None and isinstance(item, JobResult) and item.error is not None:
            gateway.metrics.result(job.request.model, item)
            return error_response(item.error, {**headers, **result_headers(item)})
        if response is None:
            response = await open_sse(request, headers)
            for name, data in [*events.start(), ("ping", {"type": "ping"})]:
                await response.write(sse(data, name))
        if isinstance(item, JobResult):
            gateway.metrics.result(job.request.model, item)
            if item.error is not None:
                status = (
                    _OVERLOADED
                    if item.error.kind == ErrorKind.OVERLOADED
                    else STATUS[item.error.kind]
                )
                await _error_event(response, status, item.error.message)
            else:
                for name, data in events.finish(item):
                    await response.write(sse(data, name))
            return response
        if item.redelivered and not again and events.sent_content:
            await _error_event(
                response,
                502,
                "the worker running this request stopped mid-stream; what was streamed "
                "cannot be taken back: send the request again",
            )
            return response
        again = again or item.redelivered
        for name, data in events.chunk(item):
            await response.write(sse(data, name))
    return response or web.Response(status=500)


async def _error_event(response: web.StreamResponse, status: int, message: str) -> None:
    await response.write(sse(error_body(status, message), "error"))
