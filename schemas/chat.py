"""The normalized request: OpenAI Chat Completions, as msgspec Structs.

OpenAI's request shape is the lingua franca producers already write, so the
job carries it as is. Adapters translate it to each provider's wire format.
Constraints live in the types (`Meta`), so a bad request fails once, at decode,
with the path of the offending field.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta


class ImageURL(msgspec.Struct, omit_defaults=True):
    """An image by URL or `data:` URI (base64)."""

    url: Annotated[str, Meta(min_length=1)]
    detail: Literal["auto", "low", "high"] | None = None


class CacheControl(msgspec.Struct):
    """A prompt-cache breakpoint (Anthropic's explicit caching): the prompt up
    to and including the marked part is cached. Providers that cache
    implicitly (OpenAI, Gemini) ignore it."""

    type: Literal["ephemeral"] = "ephemeral"


class TextPart(msgspec.Struct, tag_field="type", tag="text", omit_defaults=True):
    """A text content part."""

    text: str
    cache_control: CacheControl | None = None


class ImagePart(msgspec.Struct, tag_field="type", tag="image_url"):
    """An image content part."""

    image_url: ImageURL


ContentPart = TextPart | ImagePart
Content = str | list[ContentPart]


class FunctionCall(msgspec.Struct):
    """A function the model asked to call; `arguments` is a JSON string."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    """One tool call in an assistant turn, with the id its result must quote."""

    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


Role = Literal["system", "developer", "user", "assistant", "tool"]


class Message(msgspec.Struct, omit_defaults=True):
    """One turn of the conversation."""

    role: Role
    content: Content | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct, omit_defaults=True):
    """A function the model may call; `parameters` is a JSON Schema."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(msgspec.Struct):
    """A tool definition (only functions exist today)."""

    function: FunctionDef
    type: Literal["function"] = "function"


class NamedFunction(msgspec.Struct):
    """The function a named tool choice forces."""

    name: str


class NamedToolChoice(msgspec.Struct):
    """`tool_choice` forcing one function."""

    function: NamedFunction
    type: Literal["function"] = "function"


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class TextFormat(msgspec.Struct, tag_field="type", tag="text"):
    """Plain text output (the default)."""


class JsonObjectFormat(msgspec.Struct, tag_field="type", tag="json_object"):
    """Any JSON object."""


class JsonSchemaSpec(msgspec.Struct, omit_defaults=True):
    """A named JSON Schema the output must follow."""

    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    description: str | None = None
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, tag_field="type", tag="json_schema"):
    """Output constrained by a JSON Schema."""

    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat


class StreamOptions(msgspec.Struct, omit_defaults=True):
    """OpenAI's stream options; usage is always reported by modelyard."""

    include_usage: bool | None = None


class ChatRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An OpenAI-style chat completion request.

    `model` is the name the producer asked for (an alias or model group);
    the router resolves it to a deployment. Only one choice (`n` = 1) is
    supported: fan-out is a job per answer.
    """

    model: Annotated[str, Meta(min_length=1, max_length=256)]
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: int | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] | None = None

    def has_cache_markers(self) -> bool:
        """Whether any content part asks for a cache breakpoint."""
        return any(
            isinstance(part, TextPart) and part.cache_control is not None
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )

    def output_limit(self) -> int | None:
        """The output token cap, whichever of OpenAI's two spellings was used."""
        return self.max_completion_tokens or self.max_tokens
