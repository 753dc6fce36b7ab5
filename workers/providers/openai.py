"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama,
Groq, Together, DeepSeek): a deployment with an `api_base` is all they need."""

from __future__ import annotations

from typing import Any

import msgspec

from modelyard.config import Deployment
from schemas.chat import ChatRequest, ToolCall
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, Usage
from workers.providers.base import (
    HttpRequest,
    HttpResponse,
    ProviderReply,
    error_for_status,
    malformed,
    retry_after_s,
)

DEFAULT_API_BASE = "https://api.openai.com/v1"

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class _Message(msgspec.Struct):
    content: str | None = None
    tool_calls: list[ToolCall] | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message
    finish_reason: str | None = None


class _ChatCompletion(msgspec.Struct):
    id: str
    model: str
    choices: list[_Choice]
    created: int = 0
    usage: dict[str, Any] | None = None


class _ErrorBody(msgspec.Struct):
    message: str = ""
    code: str | None = None
    type: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


_completion_decoder = msgspec.json.Decoder(_ChatCompletion)
_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)
_encoder = msgspec.json.Encoder()


def usage_from_openai(raw: dict[str, Any]) -> Usage:
    """OpenAI's counters already have our semantics: cached tokens sit inside
    `prompt_tokens`, reasoning tokens inside `completion_tokens`."""
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=int(raw.get("prompt_tokens") or 0),
        output_tokens=int(raw.get("completion_tokens") or 0),
        cache_read_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def error_from_openai(response: HttpResponse) -> JobError:
    """Map an OpenAI error response into the taxonomy."""
    try:
        body = _error_decoder.decode(response.body).error
    except msgspec.DecodeError:
        body = _ErrorBody(message=response.body[:200].decode("utf-8", "replace"))
    message = body.message or f"provider answered HTTP {response.status}"
    code = body.code or body.type
    if response.status == 429 and code == "insufficient_quota":
        return job_error(
            ErrorKind.RATE_LIMITED, message, retryable=False, provider_status=429, provider_code=code
        )
    if code == "context_length_exceeded":
        return job_error(
            ErrorKind.CONTEXT_WINDOW_EXCEEDED, message, provider_status=response.status, provider_code=code
        )
    if code in ("content_policy_violation", "content_filter"):
        return job_error(
            ErrorKind.CONTENT_POLICY, message, provider_status=response.status, provider_code=code
        )
    return error_for_status(response.status, message, code, response.headers)


class OpenAIAdapter:
    """Chat Completions over HTTPS with a bearer key."""

    name = "openai"

    def build_request(
        self, request: ChatRequest, deployment: Deployment, api_key: str | None
    ) -> HttpRequest:
        """The request as OpenAI takes it, with the deployment's model id."""
        body = msgspec.structs.replace(request, model=deployment.model)
        headers = {"content-type": "application/json"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        base = (deployment.api_base or DEFAULT_API_BASE).rstrip("/")
        return HttpRequest(
            method="POST",
            url=f"{base}/chat/completions",
            headers=headers,
            body=_encoder.encode(body),
        )

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """A normalized reply from a 200, or the typed error for anything else."""
        if response.status != 200:
            return error_from_openai(response)
        try:
            data = _completion_decoder.decode(response.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return malformed(response.status, str(exc))
        if not data.choices:
            return malformed(response.status, "no choices in the completion")
        choice = data.choices[0]
        raw_usage = data.usage or {}
        completion = Completion(
            id=data.id,
            model=data.model,
            content=choice.message.content,
            tool_calls=choice.message.tool_calls or None,
            refusal=choice.message.refusal,
            finish_reason=_FINISH.get(choice.finish_reason or "stop", "stop"),
            provider_finish_reason=choice.finish_reason,
            created=data.created,
        )
        return ProviderReply(
            completion=completion,
            usage=usage_from_openai(raw_usage),
            raw_usage=raw_usage,
            request_id=response.headers.get("x-request-id"),
        )


__all__ = ["OpenAIAdapter", "error_from_openai", "retry_after_s", "usage_from_openai"]
