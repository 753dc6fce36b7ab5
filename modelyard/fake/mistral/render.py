"""``Reply`` to Mistral's chat completion body and to its stream of chunks.

Streams open with a role chunk, send text one token per chunk, and close
with a chunk that carries the finish reason and the usage, then
``data: [DONE]``. Tool calls arrive whole, in one chunk (Mistral does not
stream arguments).
"""

from __future__ import annotations

import time

import msgspec

from modelyard.fake.conversation import Finish, Reply
from modelyard.fake.conversation import ToolCall as PlannedCall
from modelyard.fake.mistral.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    FunctionCall,
    Message,
    ToolCall,
    Usage,
)
from modelyard.fake.text import split_tokens

FINISH_REASONS: dict[Finish, str] = {
    "end": "stop",
    "stop_sequence": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "refused": "error",
}
DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


def completion(reply: Reply, model: str, completion_id: str) -> bytes:
    """The JSON body of a non-streamed answer."""
    calls = [tool_call(i, call) for i, call in enumerate(reply.tool_calls)] or None
    message = Message("assistant", calls, reply.content or "")
    body = ChatCompletion(
        id=completion_id,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=[Choice(0, message, FINISH_REASONS[reply.finish])],
        usage=usage(reply),
    )
    return _encode(body)


def usage(reply: Reply) -> Usage:
    return Usage(
        prompt_tokens=reply.prompt_tokens,
        total_tokens=reply.prompt_tokens + reply.completion_tokens,
        completion_tokens=reply.completion_tokens,
    )


def events(reply: Reply, model: str, completion_id: str) -> list[bytes]:
    """Server-sent events of a streamed answer, ``[DONE]`` included."""
    created = int(time.time())
    finish = FINISH_REASONS[reply.finish]
    choices = [ChunkChoice(0, Delta(role="assistant", content=""), None)]
    if reply.tool_calls:
        calls = [tool_call(i, call) for i, call in enumerate(reply.tool_calls)]
        last = ChunkChoice(0, Delta(tool_calls=calls), finish)
    else:
        choices += [
            ChunkChoice(0, Delta(content=p), None) for p in split_tokens(reply.content or "")
        ]
        last = ChunkChoice(0, Delta(content=""), finish)
    chunks = [
        ChatCompletionChunk(completion_id, "chat.completion.chunk", created, model, [c])
        for c in choices
    ]
    chunks.append(
        ChatCompletionChunk(
            completion_id, "chat.completion.chunk", created, model, [last], usage(reply)
        )
    )
    return [b"data: " + _encode(chunk) + b"\n\n" for chunk in chunks] + [DONE]


def tool_call(index: int, call: PlannedCall) -> ToolCall:
    """A planned call with a Mistral id: nine alphanumerics, stable for the same request."""
    return ToolCall(call.key[:9], "function", FunctionCall(call.name, call.arguments_json), index)
