"""OpenAI's HTTP shapes, to and from normalized jobs and results: the
gateway's `/v1/chat/completions` and the Batch API's output lines. Pure
functions, tested without a server.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from schemas.chat import ChatRequest
from schemas.codec import encode
from schemas.errors import ErrorKind, JobError
from schemas.results import JobResult, StreamChunk, Usage

# The HTTP status the gateway answers each kind of failure with; the
# official SDKs pick their exception class from it. A provider's own `auth`
# or `not_found` is the gateway's configuration at fault, not the caller's
# key or model, so the caller sees a bad gateway, as when fallbacks run out.
STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_JOB: 400,
    ErrorKind.UNKNOWN_MODEL: 404,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.CONTEXT_WINDOW_EXCEEDED: 400,
    ErrorKind.CONTENT_POLICY: 400,
    ErrorKind.AUTH: 502,
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.NOT_FOUND: 502,
    ErrorKind.SERVER_ERROR: 502,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.UNAUTHORIZED: 401,
    ErrorKind.MODEL_NOT_ALLOWED: 403,
    ErrorKind.MODEL_NOT_APPROVED: 403,
    ErrorKind.BUDGET_EXCEEDED: 429,
}

# OpenAI's `error.type` for each status family.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

# Request fields modelyard accepts and has no use for: the answer never
# depends on them, so they are not worth a warning.
_HARMLESS = frozenset({"store", "metadata", "service_tier"})


def ignored_fields(fields: Iterable[str]) -> list[str]:
    """The request's top-level fields the normalized request has no place for
    (they are dropped; the response's `x-modelyard-ignored` header names them)."""
    known = set(ChatRequest.__struct_fields__)
    return sorted(key for key in fields if key not in known and key not in _HARMLESS)


def chat_completion(result: JobResult) -> dict[str, Any]:
    """A `chat.completion` object for a successful result."""
    assert result.response is not None
    r = result.response
    message: dict[str, Any] = {"role": "assistant", "content": r.content, "refusal": r.refusal}
    if r.tool_calls:
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": c.type,
                "function": {"name": c.function.name, "arguments": c.function.arguments},
            }
            for c in r.tool_calls
        ]
    return {
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}
        ],
        "usage": usage_object(result.usage),
    }


def error_body(error: JobError, status: int | None = None) -> dict[str, Any]:
    """OpenAI's error envelope for a typed error (answered with `status`,
    its kind's by default); `param` names the request field at fault the
    way OpenAI does (`messages[0].content`)."""
    return {
        "error": {
            "message": error.message,
            "type": _TYPE_BY_STATUS.get(status or STATUS[error.kind], "api_error"),
            "param": request_param(error.field),
            "code": error.provider_code or error.kind.value,
        }
    }


def request_param(field: str | None) -> str | None:
    """A job's JSON path (`$.request.messages[0]`) as a request parameter."""
    if field is None:
        return None
    for prefix in ("$.request.", "$."):
        if field.startswith(prefix):
            return field[len(prefix) :]
    return None if field == "$" else field


def chunk_object(
    chunk: StreamChunk, *, completion_id: str, model: str, created: int, first: bool
) -> dict[str, Any]:
    """A `chat.completion.chunk` for one streamed piece (the first says the role)."""
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk.content is not None:
        delta["content"] = chunk.content
    if chunk.tool_calls:
        delta["tool_calls"] = [
            {
                "index": call.index,
                **({"id": call.id, "type": "function"} if call.id else {}),
                "function": {
                    **({"name": call.name} if call.name else {}),
                    "arguments": call.arguments or "",
                },
            }
            for call in chunk.tool_calls
        ]
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": chunk.finish_reason}
    return _chunk(completion_id, model, created, [choice])


def usage_chunk(
    result: JobResult, *, completion_id: str, model: str, created: int
) -> dict[str, Any]:
    """The last chunk `stream_options.include_usage` asks for: no choices, the usage."""
    return {**_chunk(completion_id, model, created, []), "usage": usage_object(result.usage)}


def _chunk(completion_id: str, model: str, created: int, choices: list[Any]) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }


def usage_object(usage: Usage | None) -> dict[str, Any]:
    """OpenAI's `usage` object."""
    usage = usage or Usage()
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def batch_output_line(result: JobResult, custom_id: str, *, code: str | None = None) -> bytes:
    """One line of an OpenAI Batch API output file. `code`: the line never
    ran (`batch_cancelled`, `batch_expired`): no response, that error."""
    response: dict[str, Any] | None
    if code is not None:
        assert result.error is not None
        response, error = None, {"code": code, "message": result.error.message}
    elif result.status == "ok":
        response = {
            "status_code": 200,
            "request_id": result.job_id,
            "body": chat_completion(result),
        }
        error = None
    else:
        assert result.error is not None
        response = {
            "status_code": STATUS[result.error.kind],
            "request_id": result.job_id,
            "body": error_body(result.error),
        }
        error = {"code": result.error.kind.value, "message": result.error.message}
    line = {
        "id": f"batch_req_{result.job_id}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }
    return encode(line) + b"\n"
