"""Mistral request body to ``Conversation``, rejecting what the real API rejects.

Schema problems (unknown or missing fields, wrong types, unknown enum values)
are 422s, as pydantic reports them. Problems Mistral's chat template finds
are 400s with its own messages: tool call ids must be 9 alphanumerics, roles
must follow each other in an order the template can render, and the last
message must be the user's or a tool's (or an assistant prefix).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from modelyard.fake.conversation import Conversation, Output, Role, Tool, ToolChoice, Turn
from modelyard.fake.dialect import WireError
from modelyard.fake.mistral import errors
from modelyard.fake.mistral.wire import (
    AssistantMessage,
    ChatRequest,
    Content,
    MessageIn,
    SystemMessage,
    ToolMessage,
    UserMessage,
)
from modelyard.fake.text import count_tokens
from modelyard.fake.validation import problem

TOOL_CHOICES = ("auto", "none", "any", "required")
FORMATS = ("text", "json_object", "json_schema")
FOLLOWERS: dict[str, tuple[str, ...]] = {
    "system": ("system", "user", "assistant"),
    "user": ("user", "assistant", "system"),
    "assistant": ("assistant", "user", "tool"),
    "tool": ("tool", "assistant"),
}
"""Which role may come after which, in Mistral's chat template."""
_TOOL_CALL_ID = re.compile(r"[a-zA-Z0-9]{9}")
_MESSAGE_TOKENS = 2  # [INST] and [/INST] around each message
_NON_TEXT_CHUNK_TOKENS = 85
_decode = msgspec.json.Decoder(ChatRequest).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to answer, and whether to stream it."""

    conversation: Conversation
    stream: bool


def parse(body: bytes) -> Parsed | WireError:
    """The request in body, or the 422 or 400 the real API would answer."""
    try:
        request = _decode(body)
    except msgspec.ValidationError as error:
        return errors.from_problem(problem(error), body)
    except msgspec.DecodeError:
        return errors.unparsable_body()
    for check in _CHECKS:
        if (rejected := check(request)) is not None:
            return rejected
    return Parsed(_conversation(request), request.stream)


# Checks -----------------------------------------------------------------------


def _check_enums(request: ChatRequest) -> WireError | None:
    choice = request.tool_choice
    if isinstance(choice, str) and choice not in TOOL_CHOICES:
        return errors.enum(("tool_choice",), choice, TOOL_CHOICES)
    response_format = request.response_format
    if response_format is not None and response_format.type not in FORMATS:
        return errors.enum(("response_format", "type"), response_format.type, FORMATS)
    return None


def _check_tool_call_ids(request: ChatRequest) -> WireError | None:
    for message in request.messages:
        ids = (
            [c.id for c in message.tool_calls or ()]
            if isinstance(message, AssistantMessage)
            else []
        )
        if isinstance(message, ToolMessage) and message.tool_call_id is not None:
            ids.append(message.tool_call_id)
        for value in ids:
            if not _TOOL_CALL_ID.fullmatch(value):
                return errors.tool_call_id(value)
    return None


def _check_order(request: ChatRequest) -> WireError | None:
    messages = request.messages
    if not messages:
        return errors.invalid("Conversation must have at least one message")
    for previous, message in itertools.pairwise(messages):
        before, now = _tag(previous), _tag(message)
        if now not in FOLLOWERS[before]:
            return errors.message_order(f"Unexpected role '{now}' after role '{before}'")
    last = messages[-1]
    if isinstance(last, SystemMessage) or (isinstance(last, AssistantMessage) and not last.prefix):
        return errors.message_order(
            "Expected last role User or Tool (or Assistant with prefix True) for serving"
            f" but got {_tag(last)}"
        )
    return None


_CHECKS: tuple[Callable[[ChatRequest], WireError | None], ...] = (
    _check_enums,
    _check_tool_call_ids,
    _check_order,
)


# Translation ------------------------------------------------------------------


def _conversation(request: ChatRequest) -> Conversation:
    """The neutral conversation of a request that passed every check."""
    preamble = _preamble(request)
    return Conversation(
        model=request.model,
        turns=tuple(_turn(message) for message in request.messages),
        preamble=preamble,
        preamble_tokens=count_tokens(preamble) if preamble else 0,
        tools=tuple(Tool(t.function.name, t.function.parameters) for t in request.tools or ()),
        tool_choice=_tool_choice(request),
        parallel_tool_calls=request.parallel_tool_calls is not False,
        output=_output(request),
        max_tokens=request.max_tokens,
        stop=(request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ()),
        caching="none",
    )


def _turn(message: MessageIn) -> Turn:
    """A message as text (tool calls written out) with its tokens in Mistral's template."""
    text, other_chunks = _content_text(message.content)
    if isinstance(message, AssistantMessage):
        for call in message.tool_calls or ():
            arguments = call.function.arguments
            written = arguments if isinstance(arguments, str) else _encode(arguments).decode()
            text += f"\n{call.function.name} {written}"
    tokens = _MESSAGE_TOKENS + count_tokens(text) + other_chunks * _NON_TEXT_CHUNK_TOKENS
    return Turn(_role(message), text, tokens)


def _content_text(content: Content | None) -> tuple[str, int]:
    """The text of a message's content, and how many non-text chunks it had."""
    if content is None:
        return "", 0
    if isinstance(content, str):
        return content, 0
    texts = [chunk.text for chunk in content if chunk.text is not None]
    return "\n".join(texts), len(content) - len(texts)


def _role(message: MessageIn) -> Role:
    if isinstance(message, UserMessage):
        return "user"
    if isinstance(message, AssistantMessage):
        return "assistant"
    return "system" if isinstance(message, SystemMessage) else "tool"


def _tag(message: MessageIn) -> str:
    return {SystemMessage: "system", UserMessage: "user", AssistantMessage: "assistant"}.get(
        type(message), "tool"
    )


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
    if choice is None or choice == "auto":
        return ToolChoice()
    if isinstance(choice, str):
        return ToolChoice("none" if choice == "none" else "required")
    return ToolChoice("named", choice.function.name)


def _output(request: ChatRequest) -> Output:
    response_format = request.response_format
    if response_format is None or response_format.type == "text":
        return Output()
    if response_format.type == "json_schema" and response_format.json_schema is not None:
        return Output("json_schema", response_format.json_schema.schema)
    return Output("json_object")
