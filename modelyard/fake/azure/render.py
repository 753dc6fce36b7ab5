"""``Reply`` to Azure's chat completion body and stream: OpenAI's, plus content-filter results.

A stream opens with Azure's prompt-filter chunk (no choices, empty id and
model), then OpenAI's chunks with each choice's filter results.
"""

from __future__ import annotations

import msgspec

from modelyard.fake.azure.wire import (
    CHOICE_FILTER_RESULTS,
    NO_FILTER_RESULTS,
    PROMPT_FILTER_RESULTS,
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Message,
    Usage,
)
from modelyard.fake.conversation import Reply
from modelyard.fake.openai import render as openai
from modelyard.fake.openai.wire import CompletionTokensDetails, Delta, PromptTokensDetails

_encode = msgspec.json.Encoder().encode
_PROMPT_FILTER_CHUNK = (
    b"data: "
    + _encode(ChatCompletionChunk([], 0, "", "", "", prompt_filter_results=PROMPT_FILTER_RESULTS))
    + b"\n\n"
)


def completion(reply: Reply, envelope: openai.Envelope) -> bytes:
    """The JSON body of a non-streamed answer."""
    message = Message([], reply.content, None, "assistant")
    if reply.tool_calls:
        message.tool_calls = [openai.tool_call(call) for call in reply.tool_calls]
    choice = Choice(_filters(reply), openai.FINISH_REASONS[reply.finish], 0, None, message)
    body = ChatCompletion(
        choices=[choice],
        created=envelope.created,
        id=envelope.id,
        model=envelope.model,
        object="chat.completion",
        prompt_filter_results=PROMPT_FILTER_RESULTS,
        system_fingerprint=openai.SYSTEM_FINGERPRINT,
        usage=usage(reply),
    )
    return _encode(body)


def usage(reply: Reply) -> Usage:
    """OpenAI's usage figures, in Azure's key order."""
    return Usage(
        completion_tokens=reply.completion_tokens,
        completion_tokens_details=CompletionTokensDetails(reasoning_tokens=reply.reasoning_tokens),
        prompt_tokens=reply.prompt_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=reply.cached_tokens),
        total_tokens=reply.prompt_tokens + reply.completion_tokens,
    )


def events(reply: Reply, envelope: openai.Envelope, include_usage: bool) -> list[bytes]:
    """The prompt-filter chunk, OpenAI's chunks with filter results, then ``[DONE]``."""
    deltas = openai.deltas(reply)
    choices = [ChunkChoice(_delta_filters(i, d), d, None, 0, None) for i, d in enumerate(deltas)]
    choices.append(
        ChunkChoice(NO_FILTER_RESULTS, Delta(), openai.FINISH_REASONS[reply.finish], 0, None)
    )
    chunks = [_chunk(envelope, [choice], include_usage) for choice in choices]
    if include_usage:
        chunks.append(_chunk(envelope, [], include_usage, usage(reply)))
    sent = [b"data: " + _encode(chunk) + b"\n\n" for chunk in chunks]
    return [_PROMPT_FILTER_CHUNK, *sent, openai.DONE]


def _chunk(
    envelope: openai.Envelope,
    choices: list[ChunkChoice],
    include_usage: bool,
    chunk_usage: Usage | None = None,
) -> ChatCompletionChunk:
    chunk = ChatCompletionChunk(
        choices=choices,
        created=envelope.created,
        id=envelope.id,
        model=envelope.model,
        object="chat.completion.chunk",
        system_fingerprint=openai.SYSTEM_FINGERPRINT,
    )
    if include_usage:
        chunk.usage = chunk_usage
    return chunk


def _filters(reply: Reply) -> msgspec.Raw:
    """Text is filtered (and passes); tool calls are not."""
    return NO_FILTER_RESULTS if reply.tool_calls else CHOICE_FILTER_RESULTS


def _delta_filters(index: int, delta: Delta) -> msgspec.Raw:
    """The role delta carries no results; each content delta carries its text's."""
    return CHOICE_FILTER_RESULTS if index and isinstance(delta.content, str) else NO_FILTER_RESULTS
