"""Normalized results back into OpenAI's response shapes (Batch API output, HTTP)."""

from __future__ import annotations

from typing import Any

from schemas.codec import encode
from schemas.errors import ErrorKind, JobError
from schemas.results import JobResult

# The HTTP status OpenAI would have used for each kind of failure.
STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_JOB: 400,
    ErrorKind.UNKNOWN_MODEL: 404,
    ErrorKind.RATE_LIMITED: 429,
    ErrorKind.OVERLOADED: 503,
    ErrorKind.TIMEOUT: 504,
    ErrorKind.CONTEXT_WINDOW_EXCEEDED: 400,
    ErrorKind.CONTENT_POLICY: 400,
    ErrorKind.AUTH: 401,
    ErrorKind.BAD_REQUEST: 400,
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.SERVER_ERROR: 502,
    ErrorKind.DEADLINE_EXCEEDED: 408,
}


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
    usage = result.usage
    return {
        "id": r.id,
        "object": "chat.completion",
        "created": r.created,
        "model": r.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish_reason}
        ],
        "usage": {
            "prompt_tokens": usage.input_tokens if usage else 0,
            "completion_tokens": usage.output_tokens if usage else 0,
            "total_tokens": usage.total_tokens if usage else 0,
            "prompt_tokens_details": {"cached_tokens": usage.cache_read_tokens if usage else 0},
            "completion_tokens_details": {
                "reasoning_tokens": usage.reasoning_tokens if usage else 0
            },
        },
    }


def error_body(error: JobError) -> dict[str, Any]:
    """OpenAI's error envelope for a typed error."""
    return {
        "error": {
            "message": error.message,
            "type": error.kind.value,
            "param": error.field,
            "code": error.provider_code or error.kind.value,
        }
    }


def batch_output_line(result: JobResult, custom_id: str) -> bytes:
    """One line of an OpenAI Batch API output file."""
    if result.status == "ok":
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
