"""OpenAI Chat Completions, and every server that speaks it (vLLM, Ollama,
Groq, Together, DeepSeek): a deployment with an `api_base` is all they need."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from modelyard.config import Deployment
from schemas.chat import ChatRequest, FunctionCall, StreamOptions, ToolCall
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, RateLimits, ToolCallDelta, Usage
from workers.providers.base import (
    AdapterError,
    HttpRequest,
    HttpResponse,
    ProviderReply,
    StreamDelta,
    error_for_status,
    malformed,
    openai_rate_limits,
    options_problem,
    retry_after_s,
    set_params,
)

DEFAULT_API_BASE = "https://api.openai.com/v1"

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
    "model_length": "length",  # Mistral: the model's context filled up mid-answer
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
_error_encoder = _encoder


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
            ErrorKind.RATE_LIMITED,
            message,
            retryable=False,
            provider_status=429,
            provider_code=code,
        )
    if code == "context_length_exceeded":
        return job_error(
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
            message,
            provider_status=response.status,
            provider_code=code,
        )
    if code in ("content_policy_violation", "content_filter"):
        return job_error(
            ErrorKind.CONTENT_POLICY, message, provider_status=response.status, provider_code=code
        )
    return error_for_status(response.status, message, code, response.headers)


class _FunctionDelta(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    index: int
    id: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct):
    delta: _Delta
    finish_reason: str | None = None


class _Chunk(msgspec.Struct):
    id: str = ""
    model: str = ""
    created: int = 0
    choices: list[_ChunkChoice] = msgspec.field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: _ErrorBody | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


class OpenAIStreamDecoder:
    """Reads `chat.completion.chunk` events and rebuilds the whole completion.

    OpenAI ends a stream with `data: [DONE]`; an error after the 200 arrives
    as a `data: {"error": ...}` event. A stream that stops before `[DONE]` is
    a retryable server error.
    """

    def __init__(self, request_id: str | None) -> None:
        self._request_id = request_id
        self._first: _Chunk | None = None
        self._text: list[str] = []
        self._refusal: list[str] = []
        self._calls: dict[int, tuple[str, str, list[str]]] = {}
        self._finish: str | None = None
        self._usage: dict[str, Any] | None = None
        self._done = False
        self._error: JobError | None = None

    def feed(self, event: str | None, data: str) -> list[StreamDelta]:
        """Deltas of one chunk; `[DONE]` marks the clean end."""
        if data.strip() == "[DONE]":
            self._done = True
            return []
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._error = self._error or malformed(200, f"stream chunk: {exc}")
            return []
        if chunk.error is not None:
            self._error = _stream_error(chunk.error)
            return []
        self._first = self._first or chunk
        self._usage = chunk.usage or self._usage
        return [self._delta(choice) for choice in chunk.choices[:1]]

    def _delta(self, choice: _ChunkChoice) -> StreamDelta:
        delta = choice.delta
        if delta.content:
            self._text.append(delta.content)
        if delta.refusal:
            self._refusal.append(delta.refusal)
        pieces = [self._tool_piece(call) for call in delta.tool_calls or ()]
        if choice.finish_reason:
            self._finish = choice.finish_reason
        return StreamDelta(
            content=delta.content or None,
            tool_calls=pieces or None,
            finish_reason=_FINISH.get(choice.finish_reason, "stop")
            if choice.finish_reason
            else None,
        )

    def _tool_piece(self, call: _ToolCallDelta) -> ToolCallDelta:
        function = call.function or _FunctionDelta()
        call_id, name, arguments = self._calls.setdefault(call.index, ("", "", []))
        self._calls[call.index] = (call_id or call.id or "", name or function.name or "", arguments)
        if function.arguments:
            arguments.append(function.arguments)
        return ToolCallDelta(
            index=call.index, id=call.id, name=function.name, arguments=function.arguments
        )

    def finish(self) -> ProviderReply | JobError:
        """The completion the chunks add up to, or the error that ended them."""
        if self._error is not None:
            return self._error
        if not self._done or self._first is None:
            return malformed(200, "the stream ended before [DONE]")
        calls = [
            ToolCall(id=call_id, function=FunctionCall(name=name, arguments="".join(arguments)))
            for _, (call_id, name, arguments) in sorted(self._calls.items())
        ]
        completion = Completion(
            id=self._first.id,
            model=self._first.model,
            content="".join(self._text) if self._text else None,
            tool_calls=calls or None,
            refusal="".join(self._refusal) if self._refusal else None,
            finish_reason=_FINISH.get(self._finish or "stop", "stop"),
            provider_finish_reason=self._finish,
            created=self._first.created,
        )
        raw_usage = self._usage or {}
        return ProviderReply(
            completion=completion,
            usage=usage_from_openai(raw_usage),
            raw_usage=raw_usage,
            request_id=self._request_id,
        )

    def usage_so_far(self) -> tuple[Usage, dict[str, Any]] | None:
        """OpenAI reports usage only in the last chunk: None before it."""
        return (usage_from_openai(self._usage), self._usage) if self._usage else None


def _stream_error(body: _ErrorBody) -> JobError:
    """An error event inside a 200 stream; OpenAI sends these for server faults."""
    status = 429 if body.code == "rate_limit_exceeded" else 500
    envelope = _error_encoder.encode(_ErrorEnvelope(error=body))
    return error_from_openai(HttpResponse(status=status, headers={}, body=envelope))


class OpenAIOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `options` an OpenAI-family deployment may set (see `Quirks`)."""

    unsupported: list[str] = msgspec.field(default_factory=list)
    drop_params: list[str] = msgspec.field(default_factory=list)
    rename_params: dict[str, str] = msgspec.field(default_factory=dict)
    stream_usage: bool = True
    extra_headers: dict[str, str] = msgspec.field(default_factory=dict)


class Quirks(msgspec.Struct, kw_only=True, frozen=True):
    """How an OpenAI-compatible server departs from OpenAI, declared in the
    deployment's `options` instead of written as code per vendor.

    - `unsupported`: parameters the server cannot honour; a job using one is
      refused with a `bad_request` naming it (never silently dropped);
    - `drop_params`: parameters to leave out because they do not matter there
      (an operator's explicit choice, e.g. `user` for a local vLLM);
    - `rename_params`: the server's own name for a parameter
      (e.g. `max_completion_tokens: max_tokens`);
    - `stream_usage`: whether the server takes `stream_options.include_usage`.
    """

    unsupported: tuple[str, ...] = ()
    drop_params: tuple[str, ...] = ()
    rename_params: dict[str, str] = msgspec.field(default_factory=dict)
    stream_usage: bool = True

    def __bool__(self) -> bool:
        return bool(
            self.unsupported or self.drop_params or self.rename_params or not self.stream_usage
        )

    @classmethod
    def from_options(cls, options: dict[str, Any], base: Quirks | None = None) -> Quirks:
        """Quirks from config options, on top of an adapter's own defaults."""
        base = base or cls()
        return cls(
            unsupported=(*base.unsupported, *options.get("unsupported", ())),
            drop_params=(*base.drop_params, *options.get("drop_params", ())),
            rename_params={**base.rename_params, **options.get("rename_params", {})},
            stream_usage=bool(options.get("stream_usage", base.stream_usage)),
        )


def apply_quirks(payload: dict[str, Any], quirks: Quirks) -> dict[str, Any]:
    """The request body adjusted for a server's quirks; raises for unsupported params."""
    for name in quirks.unsupported:
        if payload.get(name) is not None:
            raise AdapterError(
                job_error(
                    ErrorKind.BAD_REQUEST,
                    f"this deployment does not support `{name}`",
                    field=f"$.request.{name}",
                )
            )
    if not quirks.stream_usage:
        payload.pop("stream_options", None)
    for name in quirks.drop_params:
        payload.pop(name, None)
    for old, new in quirks.rename_params.items():
        if old in payload:
            payload[new] = payload.pop(old)
    return payload


def _strip_cache_markers(payload: dict[str, Any]) -> None:
    """OpenAI caches prompts by itself and does not take Anthropic-style markers."""
    for message in payload.get("messages", ()):
        for part in message.get("content") if isinstance(message.get("content"), list) else ():
            part.pop("cache_control", None)


class OpenAIAdapter:
    """Chat Completions over HTTPS with a bearer key."""

    name = "openai"
    request_id_header = "x-request-id"

    options_type: type[OpenAIOptions] = OpenAIOptions

    def check_deployment(self, deployment: Deployment) -> str | None:
        """`options` must be the quirks this family understands."""
        return options_problem(deployment.options, self.options_type)

    def build_request(
        self, request: ChatRequest, deployment: Deployment, api_key: str | None
    ) -> HttpRequest:
        """The request as OpenAI takes it, with the deployment's model id and quirks."""
        headers = {"content-type": "application/json", **self.auth_headers(api_key)}
        headers.update(deployment.options.get("extra_headers") or {})
        return HttpRequest(
            method="POST",
            url=self.url(deployment),
            headers=headers,
            body=self.body(request, deployment),
        )

    def url(self, deployment: Deployment) -> str:
        """Where the chat completions endpoint is."""
        return f"{(deployment.api_base or DEFAULT_API_BASE).rstrip('/')}/chat/completions"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """A bearer key, when the deployment has one (local servers often do not)."""
        return {"authorization": f"Bearer {api_key}"} if api_key else {}

    def body(self, request: ChatRequest, deployment: Deployment) -> bytes:
        """The JSON body; deployment quirks applied when it declares any."""
        body = msgspec.structs.replace(request, model=deployment.model)
        if request.stream:
            # Usage arrives only when asked for; the ledger needs it.
            body = msgspec.structs.replace(body, stream_options=StreamOptions(include_usage=True))
        quirks = self.quirks(deployment)
        if not quirks and not request.has_cache_markers():
            return _encoder.encode(body)
        payload = msgspec.to_builtins(body)
        _strip_cache_markers(payload)
        return _encoder.encode(apply_quirks(payload, quirks))

    def quirks(self, deployment: Deployment) -> Quirks:
        """This deployment's request quirks (`options` in the config)."""
        return Quirks.from_options(deployment.options)

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """A normalized reply from a 200, or the typed error for anything else."""
        if response.status != 200:
            return self.error(response)
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
            request_id=response.headers.get(self.request_id_header),
        )

    def ignored(self, request: ChatRequest, deployment: Deployment) -> list[str]:
        """Parameters the deployment's quirks drop."""
        return set_params(request, self.quirks(deployment).drop_params)

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """OpenAI's `x-ratelimit-*` headers."""
        return openai_rate_limits(headers)

    def error(self, response: HttpResponse) -> JobError:
        """The typed error for a non-200 response."""
        return error_from_openai(response)

    def stream_decoder(self, request_id: str | None) -> OpenAIStreamDecoder:
        """A decoder for one streamed 200 response."""
        return OpenAIStreamDecoder(request_id)


__all__ = [
    "OpenAIAdapter",
    "OpenAIStreamDecoder",
    "Quirks",
    "apply_quirks",
    "error_from_openai",
    "retry_after_s",
    "usage_from_openai",
]
