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

# The output cap a job may ask for. Far above any model's real limit (the
# largest are a few hundred thousand tokens), yet small enough that budget
# reservations (limit times price) stay meaningful and every provider's 32-bit
# token field can hold it.
MAX_OUTPUT_TOKENS = 1_000_000

# msgspec decodes any JSON integer of up to 4300 digits into a Python int;
# providers, Postgres `bigint` and most JSON parsers stop at 64 bits.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
Int64 = Annotated[int, Meta(ge=INT64_MIN, le=INT64_MAX)]

# How deep the free-form JSON of a job (tool parameters, output schemas) may
# nest. Real JSON Schemas stay within a dozen levels; without a limit msgspec
# decodes up to ~1000 levels, and the same value can then fail to encode from
# a deeper call stack (or in an adapter's recursive translation).
MAX_JSON_DEPTH = 64

OutputTokens = Annotated[int, Meta(ge=1, le=MAX_OUTPUT_TOKENS)]


class FieldFault(ValueError):
    """Raised by a Struct's `__post_init__` about one of its own fields.

    msgspec reports the Struct's path only; the codec appends `field` so the
    producer is told the exact JSON path at fault.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"`{field}` {message}")
        self.field = field


def json_fault(value: Any) -> str | None:
    """Why a decoded free-form JSON value cannot travel on (nested deeper than
    `MAX_JSON_DEPTH`, or an integer outside 64 bits), or `None` if it can.

    Iterative, so it is safe on any value msgspec managed to decode.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_JSON_DEPTH:
                return f"nests deeper than {MAX_JSON_DEPTH} levels"
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(item, int) and not INT64_MIN <= item <= INT64_MAX:
            return "holds an integer that does not fit in 64 bits"
    return None


def _check_free_form(field: str, value: dict[str, Any] | None) -> None:
    fault = None if value is None else json_fault(value)
    if fault is not None:
        raise FieldFault(field, fault)


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

    def __post_init__(self) -> None:
        _check_free_form("parameters", self.parameters)


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

    def __post_init__(self) -> None:
        _check_free_form("schema", self.schema_)


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
    max_tokens: OutputTokens | None = None
    max_completion_tokens: OutputTokens | None = None
    stop: str | Annotated[list[str], Meta(max_length=4)] | None = None
    seed: Int64 | None = None
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
