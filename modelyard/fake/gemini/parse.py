"""Gemini GenerateContentRequest to ``Conversation``, rejecting what the real API rejects.

The model comes from the URL. Gemini's schemas (``responseSchema``, function
``parameters``) are an OpenAPI subset with upper-case types ("OBJECT"); they
are lower-cased into JSON Schema for the sampler. ``responseJsonSchema`` and
``parametersJsonSchema`` are JSON Schema already.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from modelyard.fake.conversation import Conversation, Output, Role, Tool, ToolChoice, Turn
from modelyard.fake.dialect import WireError
from modelyard.fake.gemini import errors
from modelyard.fake.gemini.wire import (
    Content,
    FunctionDeclaration,
    GenerateContentRequest,
    GenerationConfig,
    Part,
)
from modelyard.fake.text import count_tokens
from modelyard.fake.validation import problem

ROLES = ("user", "model")
MODES = ("AUTO", "ANY", "NONE", "VALIDATED")
MIME_TYPES = (
    "text/plain",
    "application/json",
    "application/xml",
    "application/yaml",
    "text/x.enum",
)
_MODE_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode"
_THINKING_MODEL = re.compile(r"thinking|gemini-(?:2\.5|[3-9])")
_NON_TEXT_PART_TOKENS = 258  # what Gemini bills for one image
_decode = msgspec.json.Decoder(GenerateContentRequest).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to answer, whether to stream it, and how (SSE or a JSON array)."""

    conversation: Conversation
    stream: bool
    sse: bool


def parse(model: str, stream: bool, sse: bool, body: bytes) -> Parsed | WireError:
    """The request in body, or the 400 the real API would answer."""
    try:
        request = _decode(body)
    except msgspec.ValidationError as error:
        return errors.from_problem(problem(error), body)
    except msgspec.DecodeError:
        return errors.unparsable_body()
    for check in _CHECKS:
        if (rejected := check(request)) is not None:
            return rejected
    return Parsed(_conversation(request, model), stream, sse)


# Checks -----------------------------------------------------------------------


def _check_contents(request: GenerateContentRequest) -> WireError | None:
    if not request.contents:
        return errors.field_problem("contents", "contents is not specified")
    for index, content in enumerate(request.contents):
        if content.role and content.role not in ROLES:
            return errors.invalid("Please use a valid role: user, model.")
        if not content.parts:
            return errors.field_problem(
                f"contents[{index}].parts", "contents.parts must not be empty."
            )
    return None


def _check_tools(request: GenerateContentRequest) -> WireError | None:
    for index, tool in enumerate(request.tools or ()):
        for position, declaration in enumerate(tool.function_declarations or ()):
            if not declaration.name:
                return errors.field_problem(
                    f"tools[{index}].function_declarations[{position}].name",
                    "Name cannot be empty.",
                )
    return None


def _check_tool_config(request: GenerateContentRequest) -> WireError | None:
    config = request.tool_config.function_calling_config if request.tool_config else None
    if config is not None and config.mode is not None and config.mode not in MODES:
        return errors.invalid(
            "Invalid value at 'tool_config.function_calling_config.mode'"
            f' ({_MODE_TYPE}), "{config.mode}"'
        )
    return None


def _check_generation_config(request: GenerateContentRequest) -> WireError | None:
    config = request.generation_config
    if config is None or config.response_mime_type is None:
        return None
    if config.response_mime_type not in MIME_TYPES:
        return errors.field_problem(
            "generation_config.response_mime_type",
            "allowed mimetypes are `text/plain`, `application/json`, `application/xml`,"
            " `application/yaml` and `text/x.enum`.",
        )
    has_schema = config.response_schema is not None or config.response_json_schema is not None
    if has_schema and config.response_mime_type == "text/plain":
        return errors.field_problem(
            "generation_config.response_mime_type",
            "When response_schema is set, response_mime_type must be one of:"
            " [application/json, text/x.enum].",
        )
    return None


_CHECKS: tuple[Callable[[GenerateContentRequest], WireError | None], ...] = (
    _check_contents,
    _check_tools,
    _check_tool_config,
    _check_generation_config,
)


# Translation ------------------------------------------------------------------


def _conversation(request: GenerateContentRequest, model: str) -> Conversation:
    """The neutral conversation of a request that passed every check."""
    config = request.generation_config or GenerationConfig()
    declarations = _declarations(request)
    preamble = _preamble(declarations, config)
    turns = [_turn(content, "system") for content in (request.system_instruction,) if content]
    turns += [_turn(content, _role(content)) for content in request.contents or ()]
    tools, choice = _tools(request, declarations)
    return Conversation(
        model=model,
        turns=tuple(turns),
        preamble=preamble,
        preamble_tokens=count_tokens(preamble) if preamble else 0,
        tools=tools,
        tool_choice=choice,
        output=_output(config),
        max_tokens=config.max_output_tokens,
        stop=tuple(config.stop_sequences or ()),
        reasons=_reasons(model, config),
    )


def _turn(content: Content, role: Role) -> Turn:
    """A content as text (calls and responses written out) and its tokens."""
    texts: list[str] = []
    tokens = 0
    for part in content.parts or ():
        text = _part_text(part)
        texts.append(text)
        tokens += count_tokens(text) if text else _NON_TEXT_PART_TOKENS
    return Turn(role, "\n".join(texts), tokens)


def _part_text(part: Part) -> str:
    if part.function_call is not None:
        return f"{part.function_call.name} {_encode(part.function_call.args or {}).decode()}"
    if part.function_response is not None:
        response = part.function_response
        return f"{response.name} {_encode(response.response or {}).decode()}"
    return part.text or ""


def _role(content: Content) -> Role:
    """model speaks as the assistant; a user turn of function responses is the tools speaking."""
    if content.role == "model":
        return "assistant"
    parts = content.parts or []
    return "tool" if any(p.function_response is not None for p in parts) else "user"


def _declarations(request: GenerateContentRequest) -> list[FunctionDeclaration]:
    return [d for tool in request.tools or () for d in tool.function_declarations or ()]


def _preamble(declarations: list[FunctionDeclaration], config: GenerationConfig) -> str:
    """Function declarations and the response schema, read before the contents."""
    parts: list[bytes] = []
    if declarations:
        parts.append(_encode(declarations))
    schema = config.response_json_schema or config.response_schema
    if schema is not None:
        parts.append(_encode(schema))
    return b"\n".join(parts).decode()


def _tools(
    request: GenerateContentRequest, declarations: list[FunctionDeclaration]
) -> tuple[tuple[Tool, ...], ToolChoice]:
    """The callable functions and the calling mode; ANY with allowed names narrows the tools."""
    tools = tuple(Tool(d.name, _parameters(d)) for d in declarations)
    config = request.tool_config.function_calling_config if request.tool_config else None
    mode = (config.mode if config else None) or "AUTO"
    if mode == "NONE":
        return tools, ToolChoice("none")
    if mode != "ANY":
        return tools, ToolChoice()
    allowed = set(config.allowed_function_names or ()) if config else set()
    if allowed:
        tools = tuple(t for t in tools if t.name in allowed)
    if len(allowed) == 1 and tools:
        return tools, ToolChoice("named", tools[0].name)
    return tools, ToolChoice("required")


def _parameters(declaration: FunctionDeclaration) -> dict[str, Any]:
    if declaration.parameters_json_schema is not None:
        return declaration.parameters_json_schema
    converted: dict[str, Any] = json_schema(declaration.parameters or {})
    return converted


def _output(config: GenerationConfig) -> Output:
    if config.response_mime_type != "application/json":
        return Output()
    if config.response_json_schema is not None:
        return Output("json_schema", config.response_json_schema)
    if config.response_schema is not None:
        return Output("json_schema", json_schema(config.response_schema))
    return Output("json_object")


def _reasons(model: str, config: GenerationConfig) -> bool:
    """Gemini 2.5+ and "thinking" models think, unless the budget is 0 (flash-lite: unless > 0)."""
    thinking = config.thinking_config
    if thinking is not None and thinking.thinking_budget is not None:
        return thinking.thinking_budget != 0
    return bool(_THINKING_MODEL.search(model)) and "lite" not in model


def json_schema(schema: Any) -> Any:
    """An OpenAPI-subset schema as JSON Schema: types lower-cased, nullable kept as a type list."""
    if isinstance(schema, list):
        return [json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {key: json_schema(value) for key, value in schema.items() if key != "nullable"}
    kind = schema.get("type")
    if isinstance(kind, str):
        converted["type"] = [kind.lower(), "null"] if schema.get("nullable") else kind.lower()
    return converted
