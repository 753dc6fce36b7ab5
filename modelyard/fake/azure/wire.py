"""Azure OpenAI response bodies as msgspec structs.

Azure sends its JSON with keys in alphabetical order, and annotates prompts
and choices with content-filter results; the fake's filter never flags an
answered request, so those results are constant JSON kept as ``msgspec.Raw``.
"""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType

from modelyard.fake.openai.wire import (
    CompletionTokensDetails,
    Delta,
    PromptTokensDetails,
    ToolCall,
)

_SAFE = b'{"filtered":false,"severity":"safe"}'
_NOT_DETECTED = b'{"filtered":false,"detected":false}'
PROMPT_FILTER_RESULTS = msgspec.Raw(
    b'[{"prompt_index":0,"content_filter_results":{"hate":'
    + _SAFE
    + b',"jailbreak":'
    + _NOT_DETECTED
    + b',"self_harm":'
    + _SAFE
    + b',"sexual":'
    + _SAFE
    + b',"violence":'
    + _SAFE
    + b"}}]"
)
CHOICE_FILTER_RESULTS = msgspec.Raw(
    b'{"hate":'
    + _SAFE
    + b',"protected_material_code":'
    + _NOT_DETECTED
    + b',"protected_material_text":'
    + _NOT_DETECTED
    + b',"self_harm":'
    + _SAFE
    + b',"sexual":'
    + _SAFE
    + b',"violence":'
    + _SAFE
    + b"}"
)
NO_FILTER_RESULTS = msgspec.Raw(b"{}")


class Message(msgspec.Struct):
    annotations: list[object]
    content: str | None
    refusal: None
    role: str
    tool_calls: list[ToolCall] | UnsetType = UNSET


class Choice(msgspec.Struct):
    content_filter_results: msgspec.Raw
    finish_reason: str
    index: int
    logprobs: None
    message: Message


class Usage(msgspec.Struct):
    completion_tokens: int
    completion_tokens_details: CompletionTokensDetails
    prompt_tokens: int
    prompt_tokens_details: PromptTokensDetails
    total_tokens: int


class ChatCompletion(msgspec.Struct):
    choices: list[Choice]
    created: int
    id: str
    model: str
    object: str
    prompt_filter_results: msgspec.Raw
    system_fingerprint: str
    usage: Usage


class ChunkChoice(msgspec.Struct):
    content_filter_results: msgspec.Raw
    delta: Delta
    finish_reason: str | None
    index: int
    logprobs: None


class ChatCompletionChunk(msgspec.Struct):
    """A stream chunk; the first one of a stream carries only the prompt's filter results."""

    choices: list[ChunkChoice]
    created: int
    id: str
    model: str
    object: str
    prompt_filter_results: msgspec.Raw | UnsetType = UNSET
    system_fingerprint: str | UnsetType = UNSET
    usage: Usage | UnsetType | None = UNSET


class ErrorDetail(msgspec.Struct):
    code: str
    message: str


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
