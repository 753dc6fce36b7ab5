"""``Reply`` to Gemini's GenerateContentResponse, whole or as stream chunks.

A refused prompt has no candidates, only ``promptFeedback.blockReason``.
Streams carry text in chunks of a few tokens; the last chunk has the finish
reason and the final usage. With ``alt=sse`` each chunk is a ``data:`` event
(Google ends events with CRLF); without it the chunks form one JSON array.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET

from modelyard.fake.conversation import Finish, Reply
from modelyard.fake.gemini.wire import (
    Candidate,
    ContentOut,
    FunctionCall,
    GenerateContentResponse,
    ModalityTokens,
    PartOut,
    PromptFeedback,
    SafetyRating,
    UsageMetadata,
)
from modelyard.fake.text import split_tokens

FINISH_REASONS: dict[Finish, str] = {
    "end": "STOP",
    "stop_sequence": "STOP",
    "length": "MAX_TOKENS",
    "tool_calls": "STOP",
    "refused": "SAFETY",
}
CHUNK_TOKENS = 8
BLOCKED = PromptFeedback(
    block_reason="SAFETY",
    safety_ratings=[
        SafetyRating("HARM_CATEGORY_SEXUALLY_EXPLICIT", "NEGLIGIBLE"),
        SafetyRating("HARM_CATEGORY_HATE_SPEECH", "NEGLIGIBLE"),
        SafetyRating("HARM_CATEGORY_HARASSMENT", "NEGLIGIBLE"),
        SafetyRating("HARM_CATEGORY_DANGEROUS_CONTENT", "HIGH", blocked=True),
    ],
)
_encode = msgspec.json.Encoder().encode


def response(reply: Reply, model: str, response_id: str) -> bytes:
    """The JSON body of a non-streamed answer."""
    return _encode(_response(reply, model, response_id, _parts(reply), final=True))


def chunks(reply: Reply, model: str, response_id: str) -> list[bytes]:
    """The JSON of each stream chunk, in order."""
    if reply.finish == "refused" or reply.tool_calls:
        return [response(reply, model, response_id)]
    pieces = split_tokens(reply.content or "") or [""]
    groups = ["".join(pieces[i : i + CHUNK_TOKENS]) for i in range(0, len(pieces), CHUNK_TOKENS)]
    last = len(groups) - 1
    return [
        _encode(_response(reply, model, response_id, [PartOut(text=g)], final=i == last))
        for i, g in enumerate(groups)
    ]


def sse(chunk_bodies: list[bytes]) -> list[bytes]:
    """Chunks as server-sent events."""
    return [b"data: " + chunk + b"\r\n\r\n" for chunk in chunk_bodies]


def json_array(chunk_bodies: list[bytes]) -> list[bytes]:
    """Chunks as the pieces of one streamed JSON array."""
    pieces = [b"[" + chunk_bodies[0]] + [b",\r\n" + chunk for chunk in chunk_bodies[1:]]
    pieces[-1] += b"]"
    return pieces


def usage(reply: Reply, final: bool = True) -> UsageMetadata:
    """Gemini's usage; before the last chunk only the prompt side is known."""
    prompt = [ModalityTokens("TEXT", reply.prompt_tokens)]
    if not final:
        return UsageMetadata(
            reply.prompt_tokens, total_token_count=reply.prompt_tokens, prompt_tokens_details=prompt
        )
    cached = reply.cached_tokens
    generated = reply.completion_tokens - reply.reasoning_tokens
    return UsageMetadata(
        prompt_token_count=reply.prompt_tokens,
        candidates_token_count=generated if reply.finish != "refused" else UNSET,
        total_token_count=reply.prompt_tokens + reply.completion_tokens,
        cached_content_token_count=cached or UNSET,
        prompt_tokens_details=prompt,
        cache_tokens_details=[ModalityTokens("TEXT", cached)] if cached else UNSET,
        thoughts_token_count=reply.reasoning_tokens or UNSET,
    )


def _response(
    reply: Reply, model: str, response_id: str, parts: list[PartOut], final: bool
) -> GenerateContentResponse:
    if reply.finish == "refused":
        return GenerateContentResponse(
            prompt_feedback=BLOCKED,
            usage_metadata=usage(reply),
            model_version=model,
            response_id=response_id,
        )
    content = ContentOut(parts=parts) if parts else ContentOut()
    candidate = Candidate(content, FINISH_REASONS[reply.finish] if final else UNSET)
    return GenerateContentResponse(
        candidates=[candidate],
        usage_metadata=usage(reply, final),
        model_version=model,
        response_id=response_id,
    )


def _parts(reply: Reply) -> list[PartOut]:
    """The text part, or one functionCall part per call (a call cut by the limit has no args)."""
    if reply.tool_calls:
        last = len(reply.tool_calls) - 1
        return [
            PartOut(function_call=FunctionCall(call.name, _args(reply, call.arguments, i == last)))
            for i, call in enumerate(reply.tool_calls)
        ]
    return [PartOut(text=reply.content)] if reply.content else []


def _args(reply: Reply, arguments: dict[str, Any], last: bool) -> dict[str, Any]:
    return {} if last and reply.finish == "length" else arguments
