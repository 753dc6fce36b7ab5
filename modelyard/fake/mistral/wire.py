"""Mistral chat completion request and response bodies as msgspec structs.

Mistral validates requests with pydantic and forbids unknown fields (a 422
``extra_forbidden``, e.g. for OpenAI's ``seed`` or ``max_completion_tokens``),
at the top level and in each message; the request structs do the same, and
messages are a union tagged by ``role`` as in Mistral's schema. Response
structs list fields in the order Mistral sends them.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

# Request ----------------------------------------------------------------------


class ContentChunk(msgspec.Struct):
    """A chunk of multi-part content (text, image_url, document_url, thinking...)."""

    type: str
    text: str | None = None


Content = str | list[ContentChunk]


class FunctionCallIn(msgspec.Struct):
    name: str
    arguments: str | dict[str, Any]


class ToolCallIn(msgspec.Struct):
    function: FunctionCallIn
    id: str = "null"
    type: str | None = None
    index: int | None = None


class SystemMessage(msgspec.Struct, tag_field="role", tag="system", forbid_unknown_fields=True):
    content: Content


class UserMessage(msgspec.Struct, tag_field="role", tag="user", forbid_unknown_fields=True):
    content: Content | None


class AssistantMessage(
    msgspec.Struct, tag_field="role", tag="assistant", forbid_unknown_fields=True
):
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None
    prefix: bool = False


class ToolMessage(msgspec.Struct, tag_field="role", tag="tool", forbid_unknown_fields=True):
    content: Content | None
    tool_call_id: str | None = None
    name: str | None = None


MessageIn = SystemMessage | UserMessage | AssistantMessage | ToolMessage
ROLE_TAGS = ("system", "user", "assistant", "tool")


class FunctionDef(msgspec.Struct):
    name: str
    parameters: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: str = "function"


class NamedFunction(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: NamedFunction
    type: str = "function"


class JsonSchemaFormat(msgspec.Struct):
    name: str
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class ResponseFormat(msgspec.Struct):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Every field Mistral's chat completion endpoint accepts."""

    model: str
    messages: list[MessageIn]
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stream: bool = False
    stop: str | list[str] | None = None
    random_seed: int | None = None
    metadata: dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    min_tokens: int | None = None
    repetition_penalty: float | None = None
    top_k: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    prompt_logprobs: bool | None = None
    top_prompt_logprobs: int | None = None
    n: int | None = None
    prediction: dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: str | None = None
    prompt_mode: str | None = None
    guardrails: list[dict[str, Any]] | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    safe_prompt: bool | None = None


# Response ---------------------------------------------------------------------


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    type: str
    function: FunctionCall
    index: int


class Message(msgspec.Struct):
    role: str
    tool_calls: list[ToolCall] | None
    content: str


class Choice(msgspec.Struct):
    index: int
    message: Message
    finish_reason: str


class Usage(msgspec.Struct):
    """Mistral reports no cached or reasoning detail."""

    prompt_tokens: int
    total_tokens: int
    completion_tokens: int


class ChatCompletion(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(msgspec.Struct):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | UnsetType = UNSET


class ErrorBody(msgspec.Struct):
    object: str
    message: str | dict[str, Any]
    type: str
    param: str | None
    code: str | None
