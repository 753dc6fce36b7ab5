"""Gemini request and response bodies as msgspec structs, in Google's camelCase JSON.

Request structs are lenient (unknown fields are ignored, required fields are
optional) so that ``parse`` can answer with Google's own messages. Google's
JSON parser also accepts snake_case names; the fake reads camelCase only,
which is what the official SDKs send. Response structs leave out ``UNSET``
fields, as Google leaves out unset proto fields.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

# Request ----------------------------------------------------------------------


class FunctionCallIn(msgspec.Struct):
    name: str = ""
    args: dict[str, Any] | None = None
    id: str | None = None


class FunctionResponseIn(msgspec.Struct):
    name: str = ""
    response: dict[str, Any] | None = None
    id: str | None = None


class Part(msgspec.Struct, rename="camel"):
    """One part: text, inline or file data, a function call, or a function response."""

    text: str | None = None
    inline_data: dict[str, Any] | None = None
    file_data: dict[str, Any] | None = None
    function_call: FunctionCallIn | None = None
    function_response: FunctionResponseIn | None = None
    thought: bool | None = None
    thought_signature: str | None = None


class Content(msgspec.Struct):
    role: str | None = None
    parts: list[Part] | None = None


class FunctionDeclaration(msgspec.Struct, rename="camel"):
    name: str = ""
    description: str | None = None
    parameters: dict[str, Any] | None = None
    parameters_json_schema: dict[str, Any] | None = None


class ToolIn(msgspec.Struct, rename="camel"):
    """Function declarations; Google's built-in tools (search, code execution) are ignored."""

    function_declarations: list[FunctionDeclaration] | None = None


class FunctionCallingConfig(msgspec.Struct, rename="camel"):
    mode: str | None = None
    allowed_function_names: list[str] | None = None


class ToolConfig(msgspec.Struct, rename="camel"):
    function_calling_config: FunctionCallingConfig | None = None


class ThinkingConfig(msgspec.Struct, rename="camel"):
    thinking_budget: int | None = None
    include_thoughts: bool | None = None
    thinking_level: str | None = None


class GenerationConfig(msgspec.Struct, rename="camel"):
    max_output_tokens: int | None = None
    stop_sequences: list[str] | None = None
    response_mime_type: str | None = None
    response_schema: dict[str, Any] | None = None
    response_json_schema: dict[str, Any] | None = None
    candidate_count: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: float | None = None
    seed: int | None = None
    thinking_config: ThinkingConfig | None = None


class GenerateContentRequest(msgspec.Struct, rename="camel"):
    contents: list[Content] | None = None
    system_instruction: Content | None = None
    tools: list[ToolIn] | None = None
    tool_config: ToolConfig | None = None
    generation_config: GenerationConfig | None = None
    safety_settings: list[dict[str, Any]] | None = None
    cached_content: str | None = None


# Response ---------------------------------------------------------------------


class FunctionCall(msgspec.Struct):
    name: str
    args: dict[str, Any]


class PartOut(msgspec.Struct, rename="camel"):
    text: str | UnsetType = UNSET
    function_call: FunctionCall | UnsetType = UNSET


class ContentOut(msgspec.Struct):
    parts: list[PartOut] | UnsetType = UNSET
    role: str = "model"


class Candidate(msgspec.Struct, rename="camel"):
    content: ContentOut
    finish_reason: str | UnsetType = UNSET
    index: int = 0


class ModalityTokens(msgspec.Struct, rename="camel"):
    modality: str
    token_count: int


class UsageMetadata(msgspec.Struct, rename="camel"):
    """Gemini's usage: cached tokens are inside promptTokenCount, thoughts are outside
    candidatesTokenCount but inside totalTokenCount."""

    prompt_token_count: int
    candidates_token_count: int | UnsetType = UNSET
    total_token_count: int = 0
    cached_content_token_count: int | UnsetType = UNSET
    prompt_tokens_details: list[ModalityTokens] | UnsetType = UNSET
    cache_tokens_details: list[ModalityTokens] | UnsetType = UNSET
    thoughts_token_count: int | UnsetType = UNSET


class SafetyRating(msgspec.Struct):
    category: str
    probability: str
    blocked: bool | UnsetType = UNSET


class PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str
    safety_ratings: list[SafetyRating]


class GenerateContentResponse(msgspec.Struct, rename="camel"):
    candidates: list[Candidate] | UnsetType = UNSET
    prompt_feedback: PromptFeedback | UnsetType = UNSET
    usage_metadata: UsageMetadata | UnsetType = UNSET
    model_version: str = ""
    response_id: str = ""


class Status(msgspec.Struct):
    code: int
    message: str
    status: str
    details: list[dict[str, Any]] | UnsetType = UNSET


class ErrorBody(msgspec.Struct):
    error: Status
