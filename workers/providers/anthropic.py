"""Anthropic Messages API (`POST /v1/messages`), translated to and from
OpenAI's chat shape.

Choices where the two APIs do not line up, so callers know what to expect:

- `system` and `developer` messages, wherever they appear, are hoisted into
  the top-level `system` (one text block each, in order): Anthropic has no
  system role inside `messages`.
- Consecutive turns of the same role are merged, since Anthropic requires
  user and assistant to alternate; `tool` messages become `tool_result`
  blocks of a user turn, so a run of tool results is one user turn.
- `max_tokens` is required by Anthropic: when the request sets no output
  limit, the deployment's `options["default_max_tokens"]` is used (4096 if
  unset).
- `response_format` (json_schema or json_object) becomes a forced tool whose
  input schema is the requested schema (`{"type": "object"}` for
  json_object). Its name carries the reserved `json_response__` prefix, which
  is how the reply side recognises it without seeing the request: its input
  comes back as the completion's `content` (a JSON string), with finish
  reason `stop`. Because the forced tool would stop the model from calling
  the caller's own tools, combining `response_format` with `tools` is
  refused, as are caller tools that use the reserved prefix.
- `seed` is left out: OpenAI documents it as best-effort and Anthropic has no
  equivalent. Message `name`, image `detail` and a tool's `strict` flag are
  left out for the same reason. None of this is silent: `ignored()` names
  them and the result carries a warning for each. `user` becomes
  `metadata.user_id`.
- `temperature` above 1 is refused (Anthropic's range is 0 to 1); rescaling
  would silently change what the caller asked for.
- A text part's `cache_control` (a cache breakpoint) is passed on, so
  prompt caching works as Anthropic bills it; string content has no marker.
- Anthropic sends no creation time, so `Completion.created` is 0.
- The `anthropic-ratelimit-*` request and token headers are parsed into
  the result's `rate_limits` (resets as seconds from now).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec

from modelyard.config import Deployment
from schemas.chat import (
    ChatRequest,
    Content,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    ToolCall,
)
from schemas.chat import FunctionCall as OpenAIFunctionCall
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, RateLimits, ToolCallDelta, Usage
from workers.providers.base import (
    AdapterError,
    HttpRequest,
    HttpResponse,
    ProviderReply,
    StreamDelta,
    error_for_status,
    integer,
    malformed,
    options_problem,
    retry_after_s,
    seconds_until,
    set_params,
)
from workers.providers.translate import (
    base64_data_uri,
    refuse,
    tool_arguments,
    unmapped_message_fields,
)

DEFAULT_API_BASE = "https://api.anthropic.com"
API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
RESPONSE_TOOL_PREFIX = "json_response__"
_MAX_TOOL_NAME = 64
_IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error `type` says more than the status (an `overloaded_error`
# can arrive as 529 or inside a 200 stream), so it is read first.
_KIND_BY_TYPE: dict[str, ErrorKind] = {
    "overloaded_error": ErrorKind.OVERLOADED,
    "rate_limit_error": ErrorKind.RATE_LIMITED,
    "billing_error": ErrorKind.RATE_LIMITED,
    "authentication_error": ErrorKind.AUTH,
    "permission_error": ErrorKind.AUTH,
    "not_found_error": ErrorKind.NOT_FOUND,
    "request_too_large": ErrorKind.CONTEXT_WINDOW_EXCEEDED,
    "timeout_error": ErrorKind.TIMEOUT,
    "api_error": ErrorKind.SERVER_ERROR,
    "invalid_request_error": ErrorKind.BAD_REQUEST,
}
_CONTEXT_WINDOW_WORDING = ("prompt is too long", "exceed context limit", "context window")


# --- request wire types ----------------------------------------------------


class _CacheControl(msgspec.Struct):
    type: str = "ephemeral"


class _TextBlock(msgspec.Struct, tag_field="type", tag="text", omit_defaults=True):
    text: str
    cache_control: _CacheControl | None = None


class _UrlSource(msgspec.Struct, tag_field="type", tag="url"):
    url: str


class _Base64Source(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: str
    data: str


class _ImageBlock(msgspec.Struct, tag_field="type", tag="image"):
    source: _UrlSource | _Base64Source


class _ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class _ToolResultBlock(msgspec.Struct, tag_field="type", tag="tool_result", omit_defaults=True):
    tool_use_id: str
    content: str | list[_TextBlock | _ImageBlock] | None = None


_Block = _TextBlock | _ImageBlock | _ToolUseBlock | _ToolResultBlock
_Role = Literal["user", "assistant"]


class _Turn(msgspec.Struct):
    role: _Role
    content: list[_Block]


class _Tool(msgspec.Struct, omit_defaults=True):
    name: str
    input_schema: dict[str, Any]
    description: str | None = None


class _ToolChoice(msgspec.Struct, omit_defaults=True):
    type: Literal["auto", "any", "none", "tool"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Metadata(msgspec.Struct):
    user_id: str


class _MessagesRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    model: str
    max_tokens: int
    messages: list[_Turn]
    system: list[_TextBlock] | None = None
    tools: list[_Tool] | None = None
    tool_choice: _ToolChoice | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: _Metadata | None = None
    stream: bool = False


# --- response wire types ---------------------------------------------------


class _ReplyBlock(msgspec.Struct):
    """Any content block; untagged so unknown block types (thinking, server
    tools) decode and are skipped rather than failing the reply. `input` is
    the parsed tool input, or the raw text when a stream was cut mid-JSON."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None


class _Message(msgspec.Struct):
    id: str
    model: str
    content: list[_ReplyBlock] = msgspec.field(default_factory=list)
    stop_reason: str | None = None
    usage: dict[str, Any] = msgspec.field(default_factory=dict)


class _ErrorBody(msgspec.Struct):
    type: str = ""
    message: str = ""


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


class _Delta(msgspec.Struct):
    type: str | None = None
    text: str | None = None
    partial_json: str | None = None
    stop_reason: str | None = None


class _Event(msgspec.Struct):
    type: str
    index: int = 0
    message: _Message | None = None
    content_block: _ReplyBlock | None = None
    delta: _Delta | None = None
    usage: dict[str, Any] | None = None
    error: _ErrorBody | None = None


_encoder = msgspec.json.Encoder()
_message_decoder = msgspec.json.Decoder(_Message)
_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)
_event_decoder = msgspec.json.Decoder(_Event)


# --- request translation ---------------------------------------------------


def _refuse(message: str, field: str | None = None) -> AdapterError:
    """A request Anthropic cannot express: the caller's fault, not retryable."""
    return refuse("anthropic", message, field)


def _parse_data_uri(url: str, field: str) -> _Base64Source:
    """`data:image/png;base64,...` → a base64 source; other encodings are refused."""
    media_type, data = base64_data_uri(url, field, "anthropic")
    if media_type not in _IMAGE_MEDIA_TYPES:
        raise _refuse(f"image media type {media_type or '(none)'} is not supported", field)
    return _Base64Source(media_type=media_type, data=data)


def _image_block(part: ImagePart, field: str) -> _ImageBlock:
    """An image by URL or inline base64; `detail` has no Anthropic equivalent."""
    url = part.image_url.url
    if url.startswith("data:"):
        return _ImageBlock(source=_parse_data_uri(url, field))
    return _ImageBlock(source=_UrlSource(url=url))


def _content_blocks(
    content: Content | None, field: str, *, images: bool
) -> list[_TextBlock | _ImageBlock]:
    """Text and image blocks for one message's content; empty text is dropped
    because Anthropic rejects empty text blocks."""
    if content is None or isinstance(content, str):
        return [_TextBlock(content)] if content else []
    blocks: list[_TextBlock | _ImageBlock] = []
    for j, part in enumerate(content):
        if isinstance(part, ImagePart):
            if not images:
                raise _refuse("images are only accepted in user and tool messages", f"{field}[{j}]")
            blocks.append(_image_block(part, f"{field}[{j}]"))
        elif part.text:
            marker = _CacheControl(part.cache_control.type) if part.cache_control else None
            blocks.append(_TextBlock(part.text, marker))
    return blocks


def _assistant_blocks(message: Message, field: str) -> list[_Block]:
    """Text, then one `tool_use` block per tool call."""
    blocks: list[_Block] = [*_content_blocks(message.content, f"{field}.content", images=False)]
    for j, call in enumerate(message.tool_calls or []):
        arguments = tool_arguments(call, f"{field}.tool_calls[{j}].function.arguments", "anthropic")
        blocks.append(_ToolUseBlock(id=call.id, name=call.function.name, input=arguments))
    return blocks


def _tool_result(message: Message, field: str) -> _ToolResultBlock:
    """A tool message as the `tool_result` block answering its `tool_use`."""
    if not message.tool_call_id:
        raise _refuse("tool messages need a tool_call_id", f"{field}.tool_call_id")
    content = message.content
    if isinstance(content, list):
        blocks = _content_blocks(content, f"{field}.content", images=True)
        return _ToolResultBlock(message.tool_call_id, blocks or None)
    return _ToolResultBlock(message.tool_call_id, content or None)


def _turn(message: Message, index: int) -> _Turn:
    """One non-system message as an Anthropic turn (possibly with no blocks)."""
    field = f"$.request.messages[{index}]"
    if message.role == "assistant":
        return _Turn("assistant", _assistant_blocks(message, field))
    if message.role == "tool":
        return _Turn("user", [_tool_result(message, field)])
    return _Turn("user", [*_content_blocks(message.content, f"{field}.content", images=True)])


def _turns(messages: list[Message]) -> list[_Turn]:
    """The conversation with system turns removed, empty turns dropped, and
    consecutive same-role turns merged so roles alternate."""
    turns: list[_Turn] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            continue
        turn = _turn(message, index)
        if not turn.content:
            continue
        if turns and turns[-1].role == turn.role:
            turns[-1].content.extend(turn.content)
        else:
            turns.append(turn)
    return turns


def _system(messages: list[Message]) -> list[_TextBlock] | None:
    """Every system and developer message, hoisted in order."""
    blocks: list[_TextBlock] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            field = f"$.request.messages[{index}].content"
            texts = _content_blocks(message.content, field, images=False)
            blocks.extend(block for block in texts if isinstance(block, _TextBlock))
    return blocks or None


def _tools(request: ChatRequest) -> list[_Tool] | None:
    """Function tools with their JSON Schema as `input_schema`."""
    if not request.tools:
        return None
    tools = []
    for i, tool in enumerate(request.tools):
        name = tool.function.name
        if name.startswith(RESPONSE_TOOL_PREFIX):
            field = f"$.request.tools[{i}].function.name"
            raise _refuse(f"tool names starting with {RESPONSE_TOOL_PREFIX} are reserved", field)
        schema = tool.function.parameters or {"type": "object", "properties": {}}
        tools.append(_Tool(name=name, input_schema=schema, description=tool.function.description))
    return tools


def _tool_choice(request: ChatRequest) -> _ToolChoice | None:
    """OpenAI's tool_choice and `parallel_tool_calls`, only when tools are sent."""
    if not request.tools:
        if request.tool_choice not in (None, "none", "auto"):
            raise _refuse("tool_choice requires tools", "$.request.tool_choice")
        return None
    choice = request.tool_choice or "auto"
    if choice == "none":
        return _ToolChoice("none")
    single = True if request.parallel_tool_calls is False else None
    if choice == "auto":
        return _ToolChoice("auto", disable_parallel_tool_use=single)
    if choice == "required":
        return _ToolChoice("any", disable_parallel_tool_use=single)
    return _ToolChoice("tool", name=choice.function.name, disable_parallel_tool_use=single)


def _response_tool(request: ChatRequest) -> _Tool | None:
    """The forced tool standing in for `response_format` json_schema/json_object."""
    fmt = request.response_format
    if isinstance(fmt, JsonSchemaFormat):
        spec = fmt.json_schema
        schema = spec.schema_ or {"type": "object"}
        if schema.get("type", "object") != "object":
            field = "$.request.response_format.json_schema.schema"
            raise _refuse("response_format schemas must describe a JSON object", field)
        name = (RESPONSE_TOOL_PREFIX + spec.name)[:_MAX_TOOL_NAME]
        description = spec.description or f"Respond with JSON matching the {spec.name} schema."
        return _Tool(name=name, input_schema=schema, description=description)
    if isinstance(fmt, JsonObjectFormat):
        description = "Respond with a JSON object."
        return _Tool(RESPONSE_TOOL_PREFIX + "object", {"type": "object"}, description)
    return None


def _tooling(request: ChatRequest) -> tuple[list[_Tool] | None, _ToolChoice | None]:
    """Tools and tool_choice, or the forced response tool for JSON output."""
    response_tool = _response_tool(request)
    if response_tool is None:
        return _tools(request), _tool_choice(request)
    if request.tools:
        raise _refuse("response_format cannot be combined with tools", "$.request.response_format")
    return [response_tool], _ToolChoice("tool", name=response_tool.name)


def _temperature(request: ChatRequest) -> float | None:
    """OpenAI allows up to 2, Anthropic up to 1."""
    if request.temperature is not None and request.temperature > 1:
        raise _refuse("temperature above 1 is not supported", "$.request.temperature")
    return request.temperature


def _stop(request: ChatRequest) -> list[str] | None:
    """OpenAI's `stop` (one string or a list) as `stop_sequences`."""
    if request.stop is None:
        return None
    return [request.stop] if isinstance(request.stop, str) else list(request.stop) or None


def messages_request(request: ChatRequest, deployment: Deployment) -> _MessagesRequest:
    """The Messages API body for a normalized request; raises `AdapterError`
    naming the feature for anything Anthropic cannot express."""
    tools, tool_choice = _tooling(request)
    max_tokens = request.output_limit()
    if max_tokens is None:
        max_tokens = int(deployment.options.get("default_max_tokens", DEFAULT_MAX_TOKENS))
    return _MessagesRequest(
        model=deployment.model,
        max_tokens=max_tokens,
        messages=_turns(request.messages),
        system=_system(request.messages),
        tools=tools,
        tool_choice=tool_choice,
        stop_sequences=_stop(request),
        temperature=_temperature(request),
        top_p=request.top_p,
        metadata=_Metadata(request.user) if request.user else None,
        stream=request.stream,
    )


# --- response translation --------------------------------------------------


def usage_from_anthropic(raw: dict[str, Any]) -> Usage:
    """Anthropic's three input counters are disjoint (fresh, cache read, cache
    write); our `input_tokens` is the whole prompt, so it is their sum."""
    fresh = int(raw.get("input_tokens") or 0)
    read = int(raw.get("cache_read_input_tokens") or 0)
    write = int(raw.get("cache_creation_input_tokens") or 0)
    details = raw.get("output_tokens_details") or {}
    return Usage(
        input_tokens=fresh + read + write,
        output_tokens=int(raw.get("output_tokens") or 0),
        cache_read_tokens=read,
        cache_write_tokens=write,
        reasoning_tokens=int(details.get("thinking_tokens") or 0),
    )


def _json_text(value: Any) -> str:
    """Tool input as a JSON string (raw text is kept when it never parsed)."""
    return value if isinstance(value, str) else _encoder.encode(value or {}).decode()


def _is_response_tool(block: _ReplyBlock) -> bool:
    return block.type == "tool_use" and (block.name or "").startswith(RESPONSE_TOOL_PREFIX)


def _completion(message: _Message) -> Completion:
    """Text (and the response tool's JSON) as content, other tool uses as calls."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in message.content:
        if block.type == "text" and block.text:
            texts.append(block.text)
        elif _is_response_tool(block):
            texts.append(_json_text(block.input))
        elif block.type == "tool_use":
            function = OpenAIFunctionCall(name=block.name or "", arguments=_json_text(block.input))
            calls.append(ToolCall(id=block.id or "", function=function))
    return Completion(
        id=message.id,
        model=message.model,
        content="".join(texts) if texts else None,
        tool_calls=calls or None,
        finish_reason=_finish_reason(message.stop_reason, has_calls=bool(calls)),
        provider_finish_reason=message.stop_reason,
    )


def _finish_reason(stop_reason: str | None, *, has_calls: bool) -> FinishReason:
    """`tool_use` caused by the response tool alone is a normal stop."""
    reason = _FINISH.get(stop_reason or "end_turn", "stop")
    return "stop" if reason == "tool_calls" and not has_calls else reason


def _reply(message: _Message, request_id: str | None) -> ProviderReply:
    return ProviderReply(
        completion=_completion(message),
        usage=usage_from_anthropic(message.usage),
        raw_usage=message.usage,
        request_id=request_id,
    )


def _error_kind(status: int | None, body: _ErrorBody) -> ErrorKind:
    """The error's `type` first, refined by wording, else the HTTP status."""
    if body.type == "invalid_request_error":
        wording = body.message.lower()
        if any(phrase in wording for phrase in _CONTEXT_WINDOW_WORDING):
            return ErrorKind.CONTEXT_WINDOW_EXCEEDED
    if kind := _KIND_BY_TYPE.get(body.type):
        return kind
    if status is None:
        return ErrorKind.SERVER_ERROR
    return error_for_status(status, body.message, body.type, {}).kind


def _typed_error(status: int | None, body: _ErrorBody, retry_after: float | None) -> JobError:
    message = body.message or f"anthropic answered HTTP {status}"
    # A billing error waits on a human, not the clock (like OpenAI's insufficient_quota).
    retryable = False if body.type == "billing_error" else None
    return job_error(
        _error_kind(status, body),
        message,
        retryable=retryable,
        provider_status=status,
        provider_code=body.type or None,
        retry_after_s=retry_after,
    )


def error_from_anthropic(response: HttpResponse) -> JobError:
    """Map an Anthropic error response (`{"type": "error", "error": {...}}`)."""
    try:
        body = _error_decoder.decode(response.body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = _ErrorBody(message=response.body[:200].decode("utf-8", "replace"))
    return _typed_error(response.status, body, retry_after_s(response.headers))


# --- streaming -------------------------------------------------------------


class _ToolStream(msgspec.Struct):
    """A tool_use block being streamed; `index` counts tool calls only."""

    index: int
    id: str
    name: str
    response_tool: bool
    pieces: list[str] = msgspec.field(default_factory=list)


class AnthropicStreamDecoder:
    """Reads one Messages stream and rebuilds the reply the non-streamed call
    would have returned (tool inputs are re-encoded compactly at the end)."""

    def __init__(self, request_id: str | None) -> None:
        self._request_id = request_id
        self._message: _Message | None = None
        self._blocks: dict[int, _ReplyBlock | _ToolStream] = {}
        self._tool_count = 0
        self._stopped = False
        self._error: JobError | None = None

    def feed(self, event: str | None, data: str) -> list[StreamDelta]:
        """Deltas for one SSE event; `ping` and unknown events yield none."""
        try:
            parsed = _event_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._error = self._error or malformed(200, f"stream event: {exc}")
            return []
        handler = _HANDLERS.get(parsed.type)
        return handler(self, parsed) if handler else []

    def finish(self) -> ProviderReply | JobError:
        """The whole reply, or the error the stream ended with."""
        if self._error is not None:
            return self._error
        if self._message is None or not self._stopped:
            return malformed(200, "the stream ended before message_stop")
        return _reply(self._assembled(self._message), self._request_id)

    def usage_so_far(self) -> tuple[Usage, dict[str, Any]] | None:
        """Input counted at `message_start`, output as of the last `message_delta`."""
        if self._message is None or not self._message.usage:
            return None
        return usage_from_anthropic(self._message.usage), self._message.usage

    def _assembled(self, message: _Message) -> _Message:
        blocks = [_block_from(self._blocks[i]) for i in sorted(self._blocks)]
        return msgspec.structs.replace(message, content=blocks)

    def _on_message_start(self, event: _Event) -> list[StreamDelta]:
        self._message = event.message
        return []

    def _on_block_start(self, event: _Event) -> list[StreamDelta]:
        block = event.content_block
        if block is None or block.type != "tool_use":
            self._blocks[event.index] = block or _ReplyBlock(type="unknown")
            return []
        if (block.name or "").startswith(RESPONSE_TOOL_PREFIX):
            tool = _ToolStream(-1, block.id or "", block.name or "", response_tool=True)
            self._blocks[event.index] = tool
            return []
        tool = _ToolStream(self._tool_count, block.id or "", block.name or "", response_tool=False)
        self._tool_count += 1
        self._blocks[event.index] = tool
        start = ToolCallDelta(index=tool.index, id=tool.id, name=tool.name, arguments="")
        return [StreamDelta(tool_calls=[start])]

    def _on_block_delta(self, event: _Event) -> list[StreamDelta]:
        block, delta = self._blocks.get(event.index), event.delta
        if delta is None or block is None:
            return []
        if isinstance(block, _ReplyBlock):
            if delta.type != "text_delta" or not delta.text:
                return []  # thinking and signature deltas are not part of the answer
            block.text = (block.text or "") + delta.text
            return [StreamDelta(content=delta.text)]
        if not delta.partial_json:
            return []
        block.pieces.append(delta.partial_json)
        if block.response_tool:
            return [StreamDelta(content=delta.partial_json)]
        piece = ToolCallDelta(index=block.index, arguments=delta.partial_json)
        return [StreamDelta(tool_calls=[piece])]

    def _on_message_delta(self, event: _Event) -> list[StreamDelta]:
        if self._message is None:
            return []
        stop_reason = event.delta.stop_reason if event.delta else None
        self._message = msgspec.structs.replace(
            self._message,
            usage=_merged_usage(self._message.usage, event.usage or {}),
            stop_reason=stop_reason or self._message.stop_reason,
        )
        if stop_reason is None:
            return []
        reason = _finish_reason(stop_reason, has_calls=self._tool_count > 0)
        return [StreamDelta(finish_reason=reason)]

    def _on_message_stop(self, event: _Event) -> list[StreamDelta]:
        self._stopped = True
        return []

    def _on_error(self, event: _Event) -> list[StreamDelta]:
        self._error = _typed_error(None, event.error or _ErrorBody(), None)
        return []


def _merged_usage(start: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`message_delta` usage is cumulative: its non-null counters replace
    those `message_start` reported."""
    return {**start, **{key: value for key, value in update.items() if value is not None}}


def _block_from(block: _ReplyBlock | _ToolStream) -> _ReplyBlock:
    """A streamed block as the non-streamed reply would have carried it."""
    if isinstance(block, _ReplyBlock):
        return block
    raw = "".join(block.pieces) or "{}"
    try:
        value: Any = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        value = raw  # cut off mid-JSON (max_tokens): pass on what arrived
    return _ReplyBlock(type="tool_use", id=block.id, name=block.name, input=value)


_HANDLERS = {
    "message_start": AnthropicStreamDecoder._on_message_start,
    "content_block_start": AnthropicStreamDecoder._on_block_start,
    "content_block_delta": AnthropicStreamDecoder._on_block_delta,
    "message_delta": AnthropicStreamDecoder._on_message_delta,
    "message_stop": AnthropicStreamDecoder._on_message_stop,
    "error": AnthropicStreamDecoder._on_error,
}


# --- the adapter -----------------------------------------------------------


class AnthropicOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `options` an Anthropic deployment may set."""

    default_max_tokens: Annotated[int, msgspec.Meta(ge=1)] = DEFAULT_MAX_TOKENS


class AnthropicAdapter:
    """The Messages API over HTTPS with an `x-api-key`."""

    name = "anthropic"
    request_id_header = "request-id"

    def check_deployment(self, deployment: Deployment) -> str | None:
        """Every field has a default; `options` must be ones this adapter reads."""
        return options_problem(deployment.options, AnthropicOptions)

    def build_request(
        self, request: ChatRequest, deployment: Deployment, api_key: str | None
    ) -> HttpRequest:
        """The Messages API call for a normalized request."""
        headers = {"content-type": "application/json", "anthropic-version": API_VERSION}
        if api_key:
            headers["x-api-key"] = api_key
        base = (deployment.api_base or DEFAULT_API_BASE).rstrip("/")
        body = _encoder.encode(messages_request(request, deployment))
        return HttpRequest(method="POST", url=f"{base}/v1/messages", headers=headers, body=body)

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """A normalized reply from a 200, or the typed error for anything else."""
        if response.status != 200:
            return error_from_anthropic(response)
        try:
            message = _message_decoder.decode(response.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return malformed(response.status, str(exc))
        return _reply(message, response.headers.get(self.request_id_header))

    def ignored(self, request: ChatRequest, deployment: Deployment) -> list[str]:
        """`seed`, message `name`s, image `detail` and tool `strict` have no
        Anthropic equivalent."""
        names = [*set_params(request, ("seed",)), *unmapped_message_fields(request)]
        if any(t.function.strict is not None for t in request.tools or ()):
            names.append("tools[].function.strict")
        return names

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """`anthropic-ratelimit-*` headers; resets are RFC 3339 timestamps."""
        prefix = "anthropic-ratelimit-"
        limits = RateLimits(
            limit_requests=integer(headers.get(f"{prefix}requests-limit")),
            remaining_requests=integer(headers.get(f"{prefix}requests-remaining")),
            reset_requests_s=seconds_until(headers.get(f"{prefix}requests-reset")),
            limit_tokens=integer(headers.get(f"{prefix}tokens-limit")),
            remaining_tokens=integer(headers.get(f"{prefix}tokens-remaining")),
            reset_tokens_s=seconds_until(headers.get(f"{prefix}tokens-reset")),
            retry_after_s=retry_after_s(headers),
        )
        return limits if limits != RateLimits() else None

    def stream_decoder(self, request_id: str | None) -> AnthropicStreamDecoder:
        """A decoder for one streamed 200 response."""
        return AnthropicStreamDecoder(request_id)


__all__ = [
    "AnthropicAdapter",
    "AnthropicStreamDecoder",
    "error_from_anthropic",
    "messages_request",
    "usage_from_anthropic",
]
