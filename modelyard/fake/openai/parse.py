"""OpenAI request body to ``Conversation``, rejecting what the real API rejects.

Checks run in the order the real API reports problems, and each answers
with the message, param and code OpenAI uses, so a gateway's error mapping
can be tested against the fake.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from modelyard.fake.conversation import Conversation, Output, Role, Tool, ToolChoice, Turn
from modelyard.fake.openai import errors
from modelyard.fake.openai.errors import ApiError
from modelyard.fake.openai.wire import ChatRequest, ContentPart, MessageIn
from modelyard.fake.text import count_tokens

ROLES: dict[str, Role] = {
    "system": "system",
    "assistant": "assistant",
    "user": "user",
    "function": "tool",
    "tool": "tool",
    "developer": "system",
}
TOOL_CHOICES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
_REASONING_MODEL = re.compile(r"o\d")
_MESSAGE_TOKENS = 4  # tiktoken's chat template: 3 per message plus the role
_NAME_TOKENS = 1
_PRIMING_TOKENS = 3  # "<|start|>assistant<|message|>" after the last message
_NON_TEXT_PART_TOKENS = 85  # a low-detail image; every non-text part is billed like one
_MAX_STOP = 4
_decode = msgspec.json.Decoder(ChatRequest).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to answer, and how to deliver it."""

    conversation: Conversation
    stream: bool
    include_usage: bool


def parse(body: bytes, model: str | None = None) -> Parsed | ApiError:
    """The request in body, or the 400 the real API would answer.

    A given model replaces the body's (Azure names the model in the URL).
    """
    try:
        request = _decode(body)
    except msgspec.ValidationError as error:
        return errors.wrong_type(error)
    except msgspec.DecodeError:
        return errors.unparsable_body()
    if model is not None:
        request.model = model
    for check in _CHECKS:
        if (problem := check(request)) is not None:
            return problem
    return Parsed(
        conversation=_conversation(request, request.model or "", request.messages or []),
        stream=bool(request.stream),
        include_usage=bool(request.stream_options and request.stream_options.include_usage),
    )


# Checks -----------------------------------------------------------------------


def _check_model(request: ChatRequest) -> ApiError | None:
    if not request.model:
        return errors.bad_request("you must provide a model parameter")
    return None


def _check_messages(request: ChatRequest) -> ApiError | None:
    if request.messages is None:
        return errors.missing("messages")
    if not request.messages:
        return errors.bad_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1,"
            " but got an empty array instead.",
            "messages",
            "empty_array",
        )
    for index, message in enumerate(request.messages):
        if (error := _check_message(request.messages, index, message)) is not None:
            return error
    return None


def _check_message(messages: list[MessageIn], index: int, message: MessageIn) -> ApiError | None:
    """Role, content and tool-call pairing of one message."""
    param = f"messages[{index}]"
    if message.role not in ROLES:
        return errors.invalid_value(f"{param}.role", message.role, tuple(ROLES))
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        return errors.bad_request(
            "Invalid value for 'content': expected a string, got null.", f"{param}.content"
        )
    if message.role == "tool" and not message.tool_call_id:
        return errors.missing(f"{param}.tool_call_id")
    if message.role == "tool" and not _answers_tool_call(messages, index):
        return errors.bad_request(
            "Invalid parameter: messages with role 'tool' must be a response to a preceeding"
            " message with 'tool_calls'.",
            f"{param}.role",
        )
    return None


def _answers_tool_call(messages: list[MessageIn], index: int) -> bool:
    """A tool message must follow an assistant message with tool_calls (or another tool message)."""
    for previous in reversed(messages[:index]):
        if previous.role != "tool":
            return previous.role == "assistant" and bool(previous.tool_calls)
    return False


def _check_n(request: ChatRequest) -> ApiError | None:
    if request.n is not None and request.n != 1:
        return errors.bad_request(
            f"Invalid 'n': the fake provider only supports n=1, got {request.n}.",
            "n",
            "unsupported_value",
        )
    return None


def _check_max_tokens(request: ChatRequest) -> ApiError | None:
    if request.max_tokens is not None and _reasons(request):
        return errors.bad_request(
            "Unsupported parameter: 'max_tokens' is not supported with this model."
            " Use 'max_completion_tokens' instead.",
            "max_tokens",
            "unsupported_parameter",
        )
    for name, value in (
        ("max_tokens", request.max_tokens),
        ("max_completion_tokens", request.max_completion_tokens),
    ):
        if value is not None and value < 1:
            return errors.bad_request(
                f"Invalid '{name}': integer below minimum value. Expected a value >= 1,"
                f" but got {value} instead.",
                name,
                "integer_below_min_value",
            )
    return None


def _check_stop(request: ChatRequest) -> ApiError | None:
    if isinstance(request.stop, list) and len(request.stop) > _MAX_STOP:
        return errors.bad_request(
            f"Invalid 'stop': array too long. Expected an array with maximum length"
            f" {_MAX_STOP}, but got an array with length {len(request.stop)} instead.",
            "stop",
            "array_above_max_length",
        )
    return None


def _check_stream_options(request: ChatRequest) -> ApiError | None:
    if request.stream_options is not None and not request.stream:
        return errors.bad_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
        )
    return None


def _check_tools(request: ChatRequest) -> ApiError | None:
    for index, tool in enumerate(request.tools or ()):
        if tool.function is None:
            return errors.missing(f"tools[{index}].function")
    return None


def _check_tool_choice(request: ChatRequest) -> ApiError | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if not request.tools:
        return errors.bad_request(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools'"
            " are specified.",
            "tool_choice",
        )
    if isinstance(choice, str):
        known = choice in TOOL_CHOICES
        return None if known else errors.invalid_value("tool_choice", choice, TOOL_CHOICES)
    if choice.function is None:
        return errors.missing("tool_choice.function")
    if choice.function.name not in _tool_names(request):
        return errors.bad_request(
            f"Invalid value for 'tool_choice': function '{choice.function.name}' is not"
            " one of the functions in 'tools'.",
            "tool_choice",
        )
    return None


def _check_response_format(request: ChatRequest) -> ApiError | None:
    response_format = request.response_format
    if response_format is None:
        return None
    if response_format.type not in FORMATS:
        return errors.invalid_value("response_format.type", response_format.type, FORMATS)
    if response_format.type == "json_schema" and response_format.json_schema is None:
        return errors.missing("response_format.json_schema")
    if response_format.type == "json_object" and not _mentions_json(request):
        return errors.bad_request(
            "'messages' must contain the word 'json' in some form, to use 'response_format'"
            " of type 'json_object'.",
            "messages",
        )
    return None


_CHECKS: tuple[Callable[[ChatRequest], ApiError | None], ...] = (
    _check_model,
    _check_messages,
    _check_n,
    _check_max_tokens,
    _check_stop,
    _check_stream_options,
    _check_tools,
    _check_tool_choice,
    _check_response_format,
)


# Translation ------------------------------------------------------------------


def _conversation(request: ChatRequest, model: str, messages: list[MessageIn]) -> Conversation:
    """The neutral conversation of a request that passed every check."""
    preamble = _preamble(request)
    return Conversation(
        model=model,
        turns=tuple(_turn(message) for message in messages),
        preamble=preamble,
        preamble_tokens=count_tokens(preamble) if preamble else 0,
        priming_tokens=_PRIMING_TOKENS,
        tools=tuple(
            Tool(t.function.name, t.function.parameters or {})
            for t in request.tools or ()
            if t.function is not None
        ),
        tool_choice=_tool_choice(request),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        output=_output(request),
        max_tokens=request.max_completion_tokens or request.max_tokens,
        stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
        reasons=_reasons(request),
    )


def _turn(message: MessageIn) -> Turn:
    """A message as text (tool calls written out) with its tokens in OpenAI's chat template."""
    text, other_parts = _content_text(message.content)
    for call in message.tool_calls or ():
        if call.function is not None:
            text += f"\n{call.function.name} {call.function.arguments}"
    tokens = _MESSAGE_TOKENS + count_tokens(text) + other_parts * _NON_TEXT_PART_TOKENS
    if message.name:
        tokens += _NAME_TOKENS + count_tokens(message.name)
    return Turn(ROLES[message.role], text, tokens)


def _content_text(content: str | list[ContentPart] | None) -> tuple[str, int]:
    """The text of a message's content, and how many non-text parts it had."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts = [part.text for part in content if part.text is not None]
    return "\n".join(texts), len(content) - len(texts)


def _preamble(request: ChatRequest) -> str:
    """Tool definitions and the response schema, which the model reads before the messages."""
    parts: list[bytes] = []
    if request.tools:
        parts.append(_encode(request.tools))
    if request.response_format is not None and request.response_format.json_schema is not None:
        parts.append(_encode(request.response_format.json_schema))
    return b"\n".join(parts).decode()


def _tool_choice(request: ChatRequest) -> ToolChoice:
    choice = request.tool_choice
    if choice is None:
        return ToolChoice()
    if isinstance(choice, str):
        return ToolChoice(
            "none" if choice == "none" else "required" if choice == "required" else "auto"
        )
    return ToolChoice("named", choice.function.name if choice.function else None)


def _output(request: ChatRequest) -> Output:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return Output()
    if response_format.type == "json_object":
        return Output("json_object")
    schema = response_format.json_schema.schema if response_format.json_schema else None
    return Output("json_schema", schema or {"type": "object"})


def _reasons(request: ChatRequest) -> bool:
    """o1, o3, o4-mini...: models that think before answering and bill it as reasoning."""
    return bool(request.model and _REASONING_MODEL.match(request.model))


def _tool_names(request: ChatRequest) -> set[str]:
    return {t.function.name for t in request.tools or () if t.function is not None}


def _mentions_json(request: ChatRequest) -> bool:
    return any("json" in _content_text(m.content)[0].lower() for m in request.messages or ())
