"""Anthropic's Messages API shapes, to and from normalized jobs and results:
the gateway's `/v1/messages`, so Anthropic-format clients (and coding
agents) reach every model group, whatever provider serves it.

Pure functions, tested without a server. The request is validated here,
once: a field the normalized request cannot carry is refused with its path
(`messages[2].content[0].type`), never dropped silently, except those that
only tune one provider (`top_k`, `thinking`), which are dropped and named
in the `x-modelyard-ignored` header.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from schemas.chat import (
    MAX_OUTPUT_TOKENS,
    CacheControl,
    ChatRequest,
    ContentPart,
    FunctionCall,
    FunctionDef,
    ImagePart,
    ImageURL,
    Message,
    NamedFunction,
    NamedToolChoice,
    TextPart,
    Tool,
    ToolCall,
    ToolChoice,
)
from schemas.codec import InvalidMessage, decode_with, validated
from schemas.errors import JobError
from schemas.results import JobResult, StreamChunk, Usage

# --- the request ------------------------------------------------------------


class _Cache(msgspec.Struct):
    type: Literal["ephemeral"] = "ephemeral"
    ttl: str | None = None


class _Text(msgspec.Struct, tag_field="type", tag="text"):
    text: str
    cache_control: _Cache | None = None


class _Base64(msgspec.Struct, tag_field="type", tag="base64"):
    media_type: Annotated[str, Meta(min_length=1)]
    data: Annotated[str, Meta(min_length=1)]


class _Url(msgspec.Struct, tag_field="type", tag="url"):
    url: Annotated[str, Meta(min_length=1)]


class _Image(msgspec.Struct, tag_field="type", tag="image"):
    source: _Base64 | _Url
    cache_control: _Cache | None = None


class _ToolUse(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: Annotated[str, Meta(min_length=1)]
    name: Annotated[str, Meta(min_length=1)]
    input: dict[str, Any]
    cache_control: _Cache | None = None


class _ToolResult(msgspec.Struct, tag_field="type", tag="tool_result"):
    tool_use_id: Annotated[str, Meta(min_length=1)]
    content: str | list[_Text | _Image] | None = None
    is_error: bool | None = None
    cache_control: _Cache | None = None


_Block = _Text | _Image | _ToolUse | _ToolResult


class _Turn(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[_Block]


class _ToolSpec(msgspec.Struct):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    input_schema: dict[str, Any]
    description: str | None = None
    cache_control: _Cache | None = None


class _ToolChoice(msgspec.Struct):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class _Metadata(msgspec.Struct):
    user_id: str | None = None


class MessagesRequest(msgspec.Struct, kw_only=True):
    """A `POST /v1/messages` body, as Anthropic documents it."""

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    max_tokens: Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)]
    messages: Annotated[list[_Turn], Meta(min_length=1)]
    system: str | list[_Text] | None = None
    stop_sequences: list[str] | None = None
    temperature: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    top_k: Annotated[int, Meta(ge=0)] | None = None
    tools: list[_ToolSpec] | None = None
    tool_choice: _ToolChoice | None = None
    metadata: _Metadata | None = None
    stream: bool = False
    thinking: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(MessagesRequest)
# Fields accepted and dropped: they tune one provider's sampling or thinking.
_DROPPED = ("top_k", "thinking")


def decode_messages_request(body: bytes) -> tuple[ChatRequest, list[str]]:
    """The normalized request for a Messages API body, and the fields it
    dropped; raises `InvalidMessage` naming the field at fault."""
    raw = decode_with(_decoder, body)
    if raw.stop_sequences and len(raw.stop_sequences) > 4:
        raise InvalidMessage("at most 4 stop sequences are supported", "$.stop_sequences")
    dropped = [name for name in _DROPPED if getattr(raw, name) is not None]
    messages = _system(raw.system) + [m for i, t in enumerate(raw.messages) for m in _turn(t, i)]
    request = ChatRequest(
        model=raw.model,
        messages=messages,
        max_tokens=raw.max_tokens,
        stop=raw.stop_sequences or None,
        temperature=raw.temperature,
        top_p=raw.top_p,
        tools=[_tool(t) for t in raw.tools] if raw.tools else None,
        tool_choice=_tool_choice(raw.tool_choice),
        parallel_tool_calls=_parallel(raw.tool_choice),
        user=raw.metadata.user_id if raw.metadata else None,
        stream=raw.stream,
    )
    return validated(request), dropped


def _system(system: str | list[_Text] | None) -> list[Message]:
    if system is None or system == []:
        return []
    if isinstance(system, str):
        return [Message(role="system", content=system)]
    return [Message(role="system", content=[_text(block) for block in system])]


def _text(block: _Text) -> TextPart:
    cache = CacheControl() if block.cache_control is not None else None
    return TextPart(text=block.text, cache_control=cache)


def _image(block: _Image) -> ImagePart:
    source = block.source
    url = (
        source.url if isinstance(source, _Url) else f"data:{source.media_type};base64,{source.data}"
    )
    return ImagePart(image_url=ImageURL(url=url))


def _turn(turn: _Turn, index: int) -> Iterator[Message]:
    """One Anthropic turn as OpenAI messages: tool results become `tool`
    messages (before the rest of the user's turn), tool uses an assistant's
    `tool_calls`."""
    if isinstance(turn.content, str):
        yield Message(role=turn.role, content=turn.content)
        return
    parts: list[ContentPart] = []
    calls: list[ToolCall] = []
    for j, block in enumerate(turn.content):
        where = f"$.messages[{index}].content[{j}]"
        if isinstance(block, _Text):
            parts.append(_text(block))
        elif isinstance(block, _Image):
            parts.append(_image(block))
        elif isinstance(block, _ToolUse):
            _only(turn, "assistant", where, "tool_use")
            arguments = json.dumps(block.input, separators=(",", ":"))
            calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, arguments)))
        else:
            _only(turn, "user", where, "tool_result")
            yield _tool_message(block)
    if turn.role == "assistant":
        text = "".join(p.text for p in parts if isinstance(p, TextPart)) or None
        if len(parts) != sum(isinstance(p, TextPart) for p in parts):
            raise InvalidMessage("an assistant turn holds text and tool uses only", where)
        yield Message(role="assistant", content=text, tool_calls=calls or None)
    elif parts:
        yield Message(role="user", content=parts)


def _only(turn: _Turn, role: str, where: str, kind: str) -> None:
    if turn.role != role:
        raise InvalidMessage(f"a {kind} block belongs in a {role} turn", f"{where}.type")


def _tool_message(block: _ToolResult) -> Message:
    content = block.content
    if isinstance(content, list):
        text = "".join(p.text for p in content if isinstance(p, _Text))
    else:
        text = content or ""
    if block.is_error:
        text = f"[tool error] {text}"
    return Message(role="tool", content=text, tool_call_id=block.tool_use_id)


def _tool(spec: _ToolSpec) -> Tool:
    return Tool(
        function=FunctionDef(
            name=spec.name, description=spec.description, parameters=spec.input_schema
        )
    )


def _tool_choice(choice: _ToolChoice | None) -> ToolChoice | None:
    if choice is None:
        return None
    if choice.type == "tool":
        if not choice.name:
            raise InvalidMessage(
                "`tool_choice` of type `tool` names the tool", "$.tool_choice.name"
            )
        return NamedToolChoice(function=NamedFunction(name=choice.name))
    return {"auto": "auto", "any": "required", "none": "none"}[choice.type]  # type: ignore[return-value]


def _parallel(choice: _ToolChoice | None) -> bool | None:
    if choice is None or choice.disable_parallel_tool_use is None:
        return None
    return not choice.disable_parallel_tool_use


# --- the answer -------------------------------------------------------------

_STOP_REASON = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}


def message_object(result: JobResult) -> dict[str, Any]:
    """A Messages API `message` for a successful result."""
    assert result.response is not None
    r = result.response
    content: list[dict[str, Any]] = []
    if r.content:
        content.append({"type": "text", "text": r.content})
    for call in r.tool_calls or []:
        content.append(
            {
                "type": "tool_use",
                "id": call.id,
                "name": call.function.name,
                "input": _arguments(call.function.arguments),
            }
        )
    return {
        "id": f"msg_{result.job_id}",
        "type": "message",
        "role": "assistant",
        "model": r.model,
        "content": content,
        "stop_reason": _STOP_REASON.get(r.finish_reason, "end_turn"),
        "stop_sequence": None,
        "usage": usage_object(result.usage),
    }


def _arguments(text: str) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is; text
    that is not a JSON object (a model's slip) is kept under `_raw`."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"_raw": text}
    return value if isinstance(value, dict) else {"_raw": text}


def usage_object(usage: Usage | None) -> dict[str, Any]:
    """Anthropic's `usage`: input tokens exclude what was read from or
    written to the cache (which are counted apart)."""
    usage = usage or Usage()
    fresh = usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens
    return {
        "input_tokens": max(fresh, 0),
        "output_tokens": usage.output_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
    }


# The `error.type` Anthropic uses for each HTTP status.
_ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error envelope."""
    return {
        "type": "error",
        "error": {"type": _ERROR_TYPE.get(status, "api_error"), "message": message},
    }


def job_error_body(status: int, error: JobError) -> dict[str, Any]:
    """Anthropic's envelope for a typed error, naming the field at fault."""
    where = f" (at `{error.field}`)" if error.field and error.field != "$" else ""
    return error_body(status, error.message + where)


class MessageStream:
    """Turns a job's chunks into the Messages API's event stream:
    `message_start`, then per content block `content_block_start`,
    `content_block_delta`..., `content_block_stop`, then `message_delta`
    (stop reason and usage) and `message_stop`."""

    def __init__(self, job_id: str, model: str) -> None:
        self.job_id, self.model = job_id, model
        self._block: int = -1
        self._open: str | None = None  # "text" or the open tool call's index
        self.sent_content = False  # a content block went out

    def start(self) -> list[tuple[str, dict[str, Any]]]:
        """The events that open the message."""
        message: dict[str, Any] = {
            "id": f"msg_{self.job_id}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage_object(None),
        }
        return [("message_start", {"type": "message_start", "message": message})]

    def chunk(self, chunk: StreamChunk) -> list[tuple[str, dict[str, Any]]]:
        """The events one chunk becomes."""
        events: list[tuple[str, dict[str, Any]]] = []
        if chunk.content:
            if self._open != "text":
                events += self._close()
                events += self._open_block("text", {"type": "text", "text": ""})
            events.append(self._delta({"type": "text_delta", "text": chunk.content}))
        for call in chunk.tool_calls or []:
            key = f"tool:{call.index}"
            if self._open != key:
                events += self._close()
                block = {
                    "type": "tool_use",
                    "id": call.id or "",
                    "name": call.name or "",
                    "input": {},
                }
                events += self._open_block(key, block)
            if call.arguments:
                events.append(
                    self._delta({"type": "input_json_delta", "partial_json": call.arguments})
                )
        return events

    def finish(self, result: JobResult) -> list[tuple[str, dict[str, Any]]]:
        """The events that close the message, from its final result."""
        reason = result.response.finish_reason if result.response else "stop"
        delta = {"stop_reason": _STOP_REASON.get(reason, "end_turn"), "stop_sequence": None}
        return [
            *self._close(),
            (
                "message_delta",
                {"type": "message_delta", "delta": delta, "usage": usage_object(result.usage)},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]

    def _open_block(self, key: str, block: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        self._block += 1
        self._open = key
        self.sent_content = True
        start = {"type": "content_block_start", "index": self._block, "content_block": block}
        return [("content_block_start", start)]

    def _delta(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return (
            "content_block_delta",
            {"type": "content_block_delta", "index": self._block, "delta": delta},
        )

    def _close(self) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._block})]
