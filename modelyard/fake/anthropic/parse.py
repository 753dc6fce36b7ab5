"""Anthropic request body to ``Conversation``, rejecting what the real API rejects.

The prompt is laid out the way Anthropic's cache sees it, tools first, then
the system prompt, then the messages; every block marked with
``cache_control`` (or the last block, for the top-level ``cache_control``)
becomes a ``CachePoint`` at its position in that order.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from modelyard.fake.anthropic import errors
from modelyard.fake.anthropic.wire import Block, MessageParam, MessagesRequest, ToolDef
from modelyard.fake.conversation import (
    CachePoint,
    Conversation,
    Output,
    Role,
    Tool,
    ToolChoice,
    Turn,
)
from modelyard.fake.dialect import WireError
from modelyard.fake.text import count_tokens
from modelyard.fake.validation import problem

ROLES = ("user", "assistant")
TOOL_CHOICES = ("auto", "any", "tool", "none")
BLOCK_TYPES = (
    "text",
    "image",
    "document",
    "search_result",
    "thinking",
    "redacted_thinking",
    "tool_use",
    "tool_result",
    "server_tool_use",
    "web_search_tool_result",
)
MAX_CACHE_POINTS = 4
MIN_THINKING_BUDGET = 1024
_MESSAGE_TOKENS = 4  # "\n\nHuman: " and the like around each message
_PRIMING_TOKENS = 3  # "\n\nAssistant:" after the last message
_NON_TEXT_BLOCK_TOKENS = 85
_decode = msgspec.json.Decoder(MessagesRequest).decode
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Parsed:
    """A valid request: what to answer, and whether to stream it."""

    conversation: Conversation
    stream: bool


def parse(headers: Mapping[str, str], body: bytes) -> Parsed | WireError:
    """The request in body, or the 400 the real API would answer."""
    if not headers.get("anthropic-version"):
        return errors.missing_version()
    try:
        request = _decode(body)
    except msgspec.ValidationError as error:
        return errors.from_problem(problem(error))
    except msgspec.DecodeError:
        return errors.unparsable_body()
    for check in _CHECKS:
        if (message := check(request)) is not None:
            return errors.invalid(message)
    return Parsed(_conversation(request, request.model or ""), bool(request.stream))


# Checks: each returns the real API's message, or None -------------------------


def _check_required(request: MessagesRequest) -> str | None:
    for name in ("max_tokens", "messages", "model"):
        if getattr(request, name) is None:
            return f"{name}: Field required"
    return None


def _check_ranges(request: MessagesRequest) -> str | None:
    if request.max_tokens is not None and request.max_tokens < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    for name, value in (("temperature", request.temperature), ("top_p", request.top_p)):
        if value is not None and value < 0:
            return f"{name}: Input should be greater than or equal to 0"
        if value is not None and value > 1:
            return f"{name}: Input should be less than or equal to 1"
    return None


def _check_roles(request: MessagesRequest) -> str | None:
    for index, message in enumerate(request.messages or ()):
        if message.role not in ROLES:
            return f"messages.{index}.role: Input should be 'user' or 'assistant'"
    return None


def _check_blocks(request: MessagesRequest) -> str | None:
    messages = request.messages or []
    for index, message in enumerate(messages):
        last = index == len(messages) - 1
        if not message.content and not (last and message.role == "assistant"):
            return (
                f"messages.{index}: all messages must have non-empty content except for"
                " the optional final assistant message"
            )
        for position, block in enumerate(_blocks(message)):
            if (error := _check_block(f"messages.{index}.content.{position}", block)) is not None:
                return error
    return None


def _check_block(path: str, block: Block) -> str | None:
    """A block's type and the fields that type requires."""
    if block.type not in BLOCK_TYPES:
        expected = ", ".join(f"'{t}'" for t in BLOCK_TYPES)
        return (
            f"{path}: Input tag '{block.type}' found using 'type' does not match any of the"
            f" expected tags: {expected}"
        )
    required = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ()}
    for field in required.get(block.type, ()):
        if getattr(block, field) is None:
            return f"{path}.{block.type}.{field}: Field required"
    if block.type == "tool_result" and not block.tool_use_id:
        return f"{path}.tool_result.tool_use_id: Field required"
    if block.type == "text" and not block.text:
        return f"{path}.text: text content blocks must be non-empty"
    return None


def _check_order(request: MessagesRequest) -> str | None:
    messages = request.messages or []
    if not messages:
        return "messages: at least one message is required"
    if messages[0].role != "user":
        return 'messages: first message must use the "user" role'
    for previous, message in itertools.pairwise(messages):
        if message.role == previous.role:
            return (
                'messages: roles must alternate between "user" and "assistant", but found'
                f' multiple "{message.role}" roles in a row'
            )
    return None


def _check_tool_pairing(request: MessagesRequest) -> str | None:
    """Each tool_result answers a tool_use of the message before; each tool_use is answered."""
    messages = request.messages or []
    for index, message in enumerate(messages):
        asked: set[str | None] = set(_tool_use_ids(messages[index - 1])) if index else set()
        for position, block in enumerate(_blocks(message)):
            if block.type == "tool_result" and block.tool_use_id not in asked:
                return (
                    f"messages.{index}.content.{position}: unexpected `tool_use_id` found in"
                    f" `tool_result` blocks: {block.tool_use_id}. Each `tool_result` block must"
                    " have a corresponding `tool_use` block in the previous message."
                )
        if index + 1 < len(messages):
            answered = {b.tool_use_id for b in _blocks(messages[index + 1])}
            if unanswered := sorted(_tool_use_ids(message) - answered):
                return (
                    f"messages.{index + 1}: `tool_use` ids were found without `tool_result`"
                    f" blocks immediately after: {', '.join(unanswered)}. Each `tool_use` block"
                    " must have a corresponding `tool_result` block in the next message."
                )
    return None


def _check_tools(request: MessagesRequest) -> str | None:
    tools = request.tools or []
    for index, tool in enumerate(tools):
        if _is_client_tool(tool) and tool.input_schema is None:
            return f"tools.{index}.custom.input_schema: Field required"
    if len({tool.name for tool in tools}) < len(tools):
        return "tools: Tool names must be unique."
    return None


def _check_tool_choice(request: MessagesRequest) -> str | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if choice.type not in TOOL_CHOICES:
        expected = ", ".join(f"'{t}'" for t in TOOL_CHOICES)
        return (
            f"tool_choice: Input tag '{choice.type}' found using 'type' does not match any of"
            f" the expected tags: {expected}"
        )
    if choice.type in ("any", "tool") and not request.tools:
        return "tool_choice may only be specified while providing tools."
    if choice.type == "tool" and choice.name is None:
        return "tool_choice.tool.name: Field required"
    if choice.type == "tool" and choice.name not in {t.name for t in request.tools or ()}:
        return f"Tool '{choice.name}' not found in provided tools"
    return None


def _check_cache_control(request: MessagesRequest) -> str | None:
    marked = sum(tool.cache_control is not None for tool in request.tools or ())
    marked += sum(block.cache_control is not None for block in _system_blocks(request))
    for message in request.messages or ():
        marked += sum(block.cache_control is not None for block in _blocks(message))
    marked += request.cache_control is not None
    if marked > MAX_CACHE_POINTS:
        return (
            f"A maximum of {MAX_CACHE_POINTS} blocks with cache_control may be provided."
            f" Found {marked}."
        )
    return None


def _check_thinking(request: MessagesRequest) -> str | None:
    thinking = request.thinking
    if thinking is None or thinking.type != "enabled":
        return None
    budget = thinking.budget_tokens
    if budget is None:
        return "thinking.enabled.budget_tokens: Field required"
    if budget < MIN_THINKING_BUDGET:
        return (
            "thinking.enabled.budget_tokens: Input should be greater than or equal to"
            f" {MIN_THINKING_BUDGET}"
        )
    if request.max_tokens is not None and request.max_tokens <= budget:
        return "`max_tokens` must be greater than `thinking.budget_tokens`."
    return None


_CHECKS: tuple[Callable[[MessagesRequest], str | None], ...] = (
    _check_required,
    _check_ranges,
    _check_roles,
    _check_blocks,
    _check_order,
    _check_tool_pairing,
    _check_tools,
    _check_tool_choice,
    _check_cache_control,
    _check_thinking,
)


# Translation ------------------------------------------------------------------


class _Prompt:
    """The prompt in cache order: a running hash and token count, and the marked positions."""

    def __init__(self, model: str) -> None:
        self.key = hash(("anthropic", model))
        self.tokens = 0
        self.points: list[CachePoint] = []

    def add(self, text: str, tokens: int, marked: bool = False) -> None:
        self.key = hash((self.key, text))
        self.tokens += tokens
        if marked:
            self.points.append(CachePoint(self.key, self.tokens))


def _conversation(request: MessagesRequest, model: str) -> Conversation:
    """The neutral conversation of a request that passed every check."""
    prompt = _Prompt(model)
    preamble, preamble_tokens = _preamble(request, prompt)
    turns = []
    if request.system:
        turns.append(_turn("system", _system_blocks(request), prompt, last=False))
    messages = request.messages or []
    for index, message in enumerate(messages):
        last = index == len(messages) - 1 and request.cache_control is not None
        turns.append(_turn(_role(message), _blocks(message), prompt, last))
    return Conversation(
        model=model,
        turns=tuple(turns),
        preamble=preamble,
        preamble_tokens=preamble_tokens,
        priming_tokens=_PRIMING_TOKENS,
        tools=tuple(
            Tool(t.name, t.input_schema or {}) for t in request.tools or () if _is_client_tool(t)
        ),
        tool_choice=_tool_choice(request),
        parallel_tool_calls=not (
            request.tool_choice and request.tool_choice.disable_parallel_tool_use
        ),
        output=_output(request),
        max_tokens=request.max_tokens,
        stop=tuple(request.stop_sequences or ()),
        caching="explicit",
        cache_points=tuple(prompt.points),
    )


def _preamble(request: MessagesRequest, prompt: _Prompt) -> tuple[str, int]:
    """Tool definitions and the output schema, read before the system prompt."""
    texts: list[str] = []
    for tool in request.tools or ():
        texts.append(_encode(tool).decode())
        prompt.add(texts[-1], count_tokens(texts[-1]), tool.cache_control is not None)
    output = request.output_config
    if output is not None and output.format is not None and output.format.schema is not None:
        texts.append(_encode(output.format.schema).decode())
        prompt.add(texts[-1], count_tokens(texts[-1]))
    return "\n".join(texts), prompt.tokens


def _turn(role: Role, blocks: list[Block], prompt: _Prompt, last: bool) -> Turn:
    """One message as text, its tokens, and its marked blocks added to the prompt."""
    prompt.add(role, _MESSAGE_TOKENS)
    texts: list[str] = []
    tokens = _MESSAGE_TOKENS
    for position, block in enumerate(blocks):
        text = _block_text(block)
        block_tokens = count_tokens(text) if text else _non_text_tokens(block)
        marked = block.cache_control is not None or (last and position == len(blocks) - 1)
        prompt.add(text, block_tokens, marked)
        texts.append(text)
        tokens += block_tokens
    return Turn(role, "\n".join(texts), tokens)


def _block_text(block: Block) -> str:
    """What a block says: its text, a tool call written out, or a tool result's text."""
    if block.type == "tool_use":
        return f"{block.name} {_encode(block.input).decode()}"
    if block.type == "tool_result":
        return _content_text(block.content)
    if block.type == "thinking":
        return block.thinking or ""
    return block.text or ""


def _content_text(content: str | list[Block] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(block.text for block in content if block.text)


def _non_text_tokens(block: Block) -> int:
    """Images and documents are billed like one small image; empty tool results are free."""
    return _NON_TEXT_BLOCK_TOKENS if block.type in ("image", "document") else 0


def _blocks(message: MessageParam) -> list[Block]:
    content = message.content
    return [Block("text", text=content)] if isinstance(content, str) else content


def _system_blocks(request: MessagesRequest) -> list[Block]:
    system = request.system
    if system is None:
        return []
    return [Block("text", text=system)] if isinstance(system, str) else system


def _role(message: MessageParam) -> Role:
    """A user message that returns tool results is the tools speaking."""
    if message.role == "assistant":
        return "assistant"
    return "tool" if any(b.type == "tool_result" for b in _blocks(message)) else "user"


def _tool_use_ids(message: MessageParam) -> set[str]:
    return {block.id for block in _blocks(message) if block.type == "tool_use" and block.id}


def _is_client_tool(tool: ToolDef) -> bool:
    return tool.type in (None, "custom")


def _tool_choice(request: MessagesRequest) -> ToolChoice:
    choice = request.tool_choice
    if choice is None or choice.type == "auto":
        return ToolChoice()
    if choice.type == "tool":
        return ToolChoice("named", choice.name)
    return ToolChoice("required" if choice.type == "any" else "none")


def _output(request: MessagesRequest) -> Output:
    output = request.output_config
    if output is None or output.format is None or output.format.type != "json_schema":
        return Output()
    schema: dict[str, Any] = output.format.schema or {"type": "object"}
    return Output("json_schema", schema)
