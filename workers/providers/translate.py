"""Translation helpers several adapters share: refusing what cannot map,
reading tool-call arguments, and splitting base64 `data:` URIs."""

from __future__ import annotations

from typing import Any

import msgspec

from schemas.chat import ChatRequest, ImagePart, ToolCall
from schemas.errors import ErrorKind, job_error
from workers.providers.base import AdapterError


def refuse(provider: str, message: str, field: str | None = None) -> AdapterError:
    """A request the provider cannot express: the caller's fault, not retryable."""
    return AdapterError(job_error(ErrorKind.BAD_REQUEST, f"{provider}: {message}", field=field))


def tool_arguments(call: ToolCall, field: str, provider: str) -> dict[str, Any]:
    """A tool call's JSON arguments as the object providers that take parsed
    arguments (Anthropic `input`, Gemini `args`) require."""
    if not call.function.arguments.strip():
        return {}
    try:
        value = msgspec.json.decode(call.function.arguments)
    except msgspec.DecodeError:
        raise refuse(provider, "tool call arguments must be valid JSON", field) from None
    if not isinstance(value, dict):
        raise refuse(provider, "tool call arguments must be a JSON object", field)
    return value


def base64_data_uri(url: str, field: str, provider: str) -> tuple[str, str]:
    """`(media type, data)` of a `data:<type>;base64,<data>` URI; other
    encodings, and URIs without a media type, are refused."""
    header, _, data = url.partition(",")
    media_type, _, encoding = header.removeprefix("data:").partition(";")
    if encoding != "base64" or not data or not media_type:
        raise refuse(provider, "image data URIs must be base64-encoded with a media type", field)
    return media_type, data


def unmapped_message_fields(request: ChatRequest) -> list[str]:
    """Message `name`s and image `detail`s the job uses: hints that providers
    other than OpenAI have no place for (reported as warnings, not dropped
    silently)."""
    names = []
    if any(m.name for m in request.messages):
        names.append("messages[].name")
    if any(
        isinstance(part, ImagePart) and part.image_url.detail
        for m in request.messages
        if isinstance(m.content, list)
        for part in m.content
    ):
        names.append("image_url.detail")
    return names
