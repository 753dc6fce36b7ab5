"""``Reply`` to OpenAI's ChatCompletion body and to its stream of chunks."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import msgspec

from modelyard.fake.conversation import Finish, Reply
from modelyard.fake.conversation import ToolCall as PlannedCall
from modelyard.fake.openai.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    CompletionTokensDetails,
    Delta,
    FunctionCall,
    FunctionDelta,
    Message,
    PromptTokensDetails,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from modelyard.fake.text import split_tokens

FINISH_REASONS: dict[Finish, str] = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "refused": "content_filter",
}
SYSTEM_FINGERPRINT = "fp_f4ke0a1b2c"
SERVICE_TIER = "default"
DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Envelope:
    """The fields every chunk of one completion repeats."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, model: str) -> Envelope:
        """A fresh completion id (unique per response, as OpenAI's are), created now."""
        return cls(f"chatcmpl-{secrets.token_hex(15)}", int(time.time()), model)


def completion(reply: Reply, envelope: Envelope) -> bytes:
    """The JSON body of a non-streamed answer."""
    message = Message(role="assistant", content=reply.content)
    if reply.tool_calls:
        message.tool_calls = [tool_call(call) for call in reply.tool_calls]
    body = ChatCompletion(
        id=envelope.id,
        object="chat.completion",
        created=envelope.created,
        model=envelope.model,
        choices=[Choice(0, message, None, FINISH_REASONS[reply.finish])],
        usage=usage(reply),
        service_tier=SERVICE_TIER,
        system_fingerprint=SYSTEM_FINGERPRINT,
    )
    return _encode(body)


def usage(reply: Reply) -> Usage:
    """OpenAI's usage: cached tokens are inside prompt tokens, reasoning inside completion."""
    return Usage(
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        total_tokens=reply.prompt_tokens + reply.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=reply.cached_tokens),
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reply.reasoning_tokens),
    )


def events(reply: Reply, envelope: Envelope, include_usage: bool) -> list[bytes]:
    """Server-sent events of a streamed answer, ``[DONE]`` included.

    With include_usage every chunk carries ``"usage": null`` and one last
    chunk with no choices carries the usage, as OpenAI does.
    """
    chunks = [
        _chunk(envelope, [ChunkChoice(0, d, None, None)], include_usage) for d in deltas(reply)
    ]
    finish = ChunkChoice(0, Delta(), None, FINISH_REASONS[reply.finish])
    chunks.append(_chunk(envelope, [finish], include_usage))
    if include_usage:
        chunks.append(_chunk(envelope, [], include_usage, usage(reply)))
    return [b"data: " + _encode(chunk) + b"\n\n" for chunk in chunks] + [DONE]


def _chunk(
    envelope: Envelope,
    choices: list[ChunkChoice],
    include_usage: bool,
    chunk_usage: Usage | None = None,
) -> ChatCompletionChunk:
    chunk = ChatCompletionChunk(
        id=envelope.id,
        object="chat.completion.chunk",
        created=envelope.created,
        model=envelope.model,
        service_tier=SERVICE_TIER,
        system_fingerprint=SYSTEM_FINGERPRINT,
        choices=choices,
    )
    if include_usage:
        chunk.usage = chunk_usage
    return chunk


def deltas(reply: Reply) -> list[Delta]:
    """The role delta, then one delta per content token or per tool-call argument token."""
    if not reply.tool_calls:
        pieces = split_tokens(reply.content or "")
        return [Delta(role="assistant", content="", refusal=None)] + [
            Delta(content=piece) for piece in pieces
        ]
    result = [Delta(role="assistant", content=None, refusal=None)]
    for index, call in enumerate(reply.tool_calls):
        result += _call_deltas(index, call)
    first_call = result.pop(1)
    result[0].tool_calls = first_call.tool_calls  # OpenAI opens the first call in the role delta
    return result


def _call_deltas(index: int, call: PlannedCall) -> list[Delta]:
    """A call's header (id, type, name, empty arguments), then its arguments in pieces."""
    header = ToolCallDelta(
        index, f"call_{call.key}", "function", FunctionDelta(name=call.name, arguments="")
    )
    return [Delta(tool_calls=[header])] + [
        Delta(tool_calls=[ToolCallDelta(index, function=FunctionDelta(arguments=piece))])
        for piece in split_tokens(call.arguments_json)
    ]


def tool_call(call: PlannedCall) -> ToolCall:
    """A planned call as an OpenAI tool call."""
    return ToolCall(f"call_{call.key}", "function", FunctionCall(call.name, call.arguments_json))
