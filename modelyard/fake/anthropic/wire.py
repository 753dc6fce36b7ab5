"""Anthropic Messages request and response bodies as msgspec structs.

The request is strict at the top level, as the real API is (an unknown
field is a 400 "Extra inputs are not permitted"), and lenient inside, so
that ``parse`` can word each problem the way Anthropic does. Response
structs list fields in the order Anthropic sends them; ``UNSET`` fields are
left out of the JSON.
"""

from __future__ import annotations

from typing import Any

import msgspec

# Request ----------------------------------------------------------------------


class CacheControl(msgspec.Struct):
    type: str = "ephemeral"
    ttl: str | None = None


class Block(msgspec.Struct):
    """A content block of any type: text, image, tool_use, tool_result, thinking, document..."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: Any = None
    tool_use_id: str | None = None
    content: str | list[Block] | None = None
    is_error: bool | None = None
    thinking: str | None = None
    cache_control: CacheControl | None = None


class MessageParam(msgspec.Struct):
    role: str
    content: str | list[Block]


class ToolDef(msgspec.Struct):
    """A client tool (type absent or "custom") or a server tool (web_search_..., bash_...)."""

    name: str
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None
    cache_control: CacheControl | None = None


class ToolChoice(msgspec.Struct):
    type: str
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(msgspec.Struct):
    type: str
    budget_tokens: int | None = None


class JsonFormat(msgspec.Struct):
    type: str
    schema: dict[str, Any] | None = None


class OutputConfig(msgspec.Struct):
    format: JsonFormat | None = None
    effort: str | None = None


class MessagesRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Every top-level field the Messages API accepts; required ones are checked by ``parse``."""

    model: str | None = None
    messages: list[MessageParam] | None = None
    max_tokens: int | None = None
    system: str | list[Block] | None = None
    stop_sequences: list[str] | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    cache_control: CacheControl | None = None
    output_config: OutputConfig | None = None
    container: Any = None
    context_management: Any = None
    inference_geo: str | None = None
    speed: str | None = None


# Response ---------------------------------------------------------------------


class TextBlock(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ToolUseBlock(msgspec.Struct, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict[str, Any]


class CacheCreation(msgspec.Struct):
    ephemeral_5m_input_tokens: int
    ephemeral_1h_input_tokens: int = 0


class Usage(msgspec.Struct):
    """Disjoint counters: input_tokens excludes what was read from or written to the cache."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    cache_creation: CacheCreation
    output_tokens: int
    service_tier: str = "standard"


class Message(msgspec.Struct):
    id: str
    type: str
    role: str
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage


class MessageStart(msgspec.Struct, tag_field="type", tag="message_start"):
    message: Message


class BlockStart(msgspec.Struct, tag_field="type", tag="content_block_start"):
    index: int
    content_block: TextBlock | ToolUseBlock


class TextDelta(msgspec.Struct, tag_field="type", tag="text_delta"):
    text: str


class JsonDelta(msgspec.Struct, tag_field="type", tag="input_json_delta"):
    partial_json: str


class BlockDelta(msgspec.Struct, tag_field="type", tag="content_block_delta"):
    index: int
    delta: TextDelta | JsonDelta


class BlockStop(msgspec.Struct, tag_field="type", tag="content_block_stop"):
    index: int


class StopDelta(msgspec.Struct):
    stop_reason: str
    stop_sequence: str | None


class DeltaUsage(msgspec.Struct):
    """Cumulative usage at the end of a stream (Anthropic repeats the input side here)."""

    input_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int
    output_tokens: int


class MessageDelta(msgspec.Struct, tag_field="type", tag="message_delta"):
    delta: StopDelta
    usage: DeltaUsage


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorBody(msgspec.Struct, tag_field="type", tag="error"):
    error: ErrorDetail
