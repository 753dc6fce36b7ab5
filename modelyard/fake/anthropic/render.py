"""``Reply`` to Anthropic's Message body and to its stream of server-sent events."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from modelyard.fake.anthropic.wire import (
    BlockDelta,
    BlockStart,
    BlockStop,
    CacheCreation,
    DeltaUsage,
    JsonDelta,
    Message,
    MessageDelta,
    MessageStart,
    StopDelta,
    TextBlock,
    TextDelta,
    ToolUseBlock,
    Usage,
)
from modelyard.fake.conversation import Finish, Reply
from modelyard.fake.conversation import ToolCall as PlannedCall
from modelyard.fake.text import split_tokens

STOP_REASONS: dict[Finish, str] = {
    "end": "end_turn",
    "stop_sequence": "stop_sequence",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "refused": "refusal",
}
PING = b'event: ping\ndata: {"type": "ping"}\n\n'
MESSAGE_STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
_encode = msgspec.json.Encoder().encode


def message(reply: Reply, model: str, message_id: str) -> bytes:
    """The JSON body of a non-streamed answer."""
    body = Message(
        id=message_id,
        type="message",
        role="assistant",
        model=model,
        content=_blocks(reply),
        stop_reason=STOP_REASONS[reply.finish],
        stop_sequence=reply.stop_sequence,
        usage=usage(reply),
    )
    return _encode(body)


def usage(reply: Reply, output_tokens: int | None = None) -> Usage:
    """Anthropic's usage: input, cache reads and cache writes are disjoint."""
    return Usage(
        input_tokens=reply.prompt_tokens - reply.cached_tokens - reply.cache_write_tokens,
        cache_creation_input_tokens=reply.cache_write_tokens,
        cache_read_input_tokens=reply.cached_tokens,
        cache_creation=CacheCreation(ephemeral_5m_input_tokens=reply.cache_write_tokens),
        output_tokens=reply.completion_tokens if output_tokens is None else output_tokens,
    )


def events(reply: Reply, model: str, message_id: str) -> list[bytes]:
    """The stream: message_start, each block's start, deltas and stop, message_delta, stop.

    A ping follows the first block's start (or message_start when there is
    no block), as the real API sends one. Streamed tool input is the exact
    JSON text, so a call cut by max_tokens streams as unfinished JSON.
    """
    start = Message(message_id, "message", "assistant", model, [], None, None, usage(reply, 1))
    text = _has_text(reply)
    blocks = _text_events(0, reply.content or "") if text else []
    for position, call in enumerate(reply.tool_calls, start=int(text)):
        blocks += _tool_events(position, call)
    at = 1 if blocks else 0  # after the first content_block_start
    sent = [_event("message_start", MessageStart(start)), *blocks[:at], PING, *blocks[at:]]
    last = usage(reply)
    total = DeltaUsage(
        last.input_tokens,
        last.cache_creation_input_tokens,
        last.cache_read_input_tokens,
        last.output_tokens,
    )
    stop = StopDelta(STOP_REASONS[reply.finish], reply.stop_sequence)
    sent.append(_event("message_delta", MessageDelta(stop, total)))
    sent.append(MESSAGE_STOP)
    return sent


def tool_use_id(call: PlannedCall) -> str:
    """Anthropic's id for a call, stable for the same request."""
    return f"toolu_01{call.key[:22]}"


def _blocks(reply: Reply) -> list[TextBlock | ToolUseBlock]:
    """A text block (when there is text), then the tool_use blocks.

    A call cut short by max_tokens has no complete input, so it shows ``{}``.
    """
    blocks: list[TextBlock | ToolUseBlock] = []
    if _has_text(reply):
        blocks.append(TextBlock(reply.content or ""))
    for position, call in enumerate(reply.tool_calls):
        arguments: dict[str, Any] = {} if _is_cut(reply, position) else call.arguments
        blocks.append(ToolUseBlock(tool_use_id(call), call.name, arguments))
    return blocks


def _text_events(index: int, text: str) -> list[bytes]:
    """content_block_start, one text_delta per token, content_block_stop."""
    deltas = [TextDelta(piece) for piece in split_tokens(text)]
    return _block_events(index, TextBlock(""), deltas)


def _tool_events(index: int, call: PlannedCall) -> list[bytes]:
    """The tool_use block opens with empty input, which arrives as JSON pieces (cut ones too)."""
    pieces = ["", *split_tokens(call.arguments_json)]
    opened = ToolUseBlock(tool_use_id(call), call.name, {})
    return _block_events(index, opened, [JsonDelta(piece) for piece in pieces])


def _block_events(
    index: int, opened: TextBlock | ToolUseBlock, deltas: Sequence[TextDelta | JsonDelta]
) -> list[bytes]:
    return [
        _event("content_block_start", BlockStart(index, opened)),
        *(_event("content_block_delta", BlockDelta(index, delta)) for delta in deltas),
        _event("content_block_stop", BlockStop(index)),
    ]


def _has_text(reply: Reply) -> bool:
    """Refusals and empty answers have no text block; tool-only answers have content None."""
    return bool(reply.content) and reply.finish != "refused"


def _is_cut(reply: Reply, position: int) -> bool:
    """Whether the call at position is the one max_tokens cut short."""
    return reply.finish == "length" and position == len(reply.tool_calls) - 1


def _event(name: str, data: msgspec.Struct) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"
