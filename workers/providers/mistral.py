"""Mistral's chat completions: OpenAI-like, with its own names and errors.

- `seed` is `random_seed`, and `max_completion_tokens` is `max_tokens`;
- Mistral rejects parameters it does not know (422), so `user` (an abuse-
  monitoring hint with no Mistral equivalent) is left out, with a warning
  on the result, and
  `stream_options` too: Mistral reports usage in the last chunk unasked;
- finish reason `model_length` means `length`; `error` means the answer
  failed after the 200 and is reported as a retryable server error;
- errors come as `{"object": "error", "message", "type", "code"}` or, for
  validation, `{"detail": [...]}` (422, a bad request).
"""

from __future__ import annotations

import msgspec

from modelyard.config import Deployment
from schemas.errors import JobError
from workers.providers.base import HttpResponse, ProviderReply, error_for_status, malformed
from workers.providers.openai import OpenAIAdapter, OpenAIStreamDecoder, Quirks

DEFAULT_API_BASE = "https://api.mistral.ai/v1"

MISTRAL_QUIRKS = Quirks(
    drop_params=("user",),
    rename_params={"seed": "random_seed", "max_completion_tokens": "max_tokens"},
    stream_usage=False,
)


class _MistralError(msgspec.Struct):
    message: str | list[object] | None = None
    type: str | None = None
    code: str | int | None = None
    detail: list[object] | str | None = None


_error_decoder = msgspec.json.Decoder(_MistralError)


def error_from_mistral(response: HttpResponse) -> JobError:
    """Map a Mistral error response into the taxonomy."""
    try:
        body = _error_decoder.decode(response.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = _MistralError(message=response.body[:200].decode("utf-8", "replace"))
    message = body.message if isinstance(body.message, str) else None
    text = message or str(body.detail or f"provider answered HTTP {response.status}")
    code = str(body.code) if body.code is not None else body.type
    return error_for_status(response.status, text, code, response.headers)


class MistralAdapter(OpenAIAdapter):
    """La Plateforme's chat completions with a bearer key."""

    name = "mistral"
    request_id_header = "x-request-id"

    def url(self, deployment: Deployment) -> str:
        """Mistral's chat completions endpoint."""
        return f"{(deployment.api_base or DEFAULT_API_BASE).rstrip('/')}/chat/completions"

    def quirks(self, deployment: Deployment) -> Quirks:
        """Mistral's parameter names, plus any the deployment adds."""
        return Quirks.from_options(deployment.options, MISTRAL_QUIRKS)

    def error(self, response: HttpResponse) -> JobError:
        """Mistral's error shapes."""
        return error_from_mistral(response)

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """As OpenAI, except that finish reason `error` is a failure."""
        return _ended_in_error(super().parse_response(response))

    def stream_decoder(self, request_id: str | None) -> OpenAIStreamDecoder:
        """OpenAI's chunks, with Mistral's finish reason `error` a failure, as
        in a whole response."""
        return MistralStreamDecoder(request_id)


class MistralStreamDecoder(OpenAIStreamDecoder):
    """OpenAI's stream decoder for Mistral's dialect."""

    def finish(self) -> ProviderReply | JobError:
        """The completion, unless Mistral ended it with finish reason `error`."""
        return _ended_in_error(super().finish())


def _ended_in_error(reply: ProviderReply | JobError) -> ProviderReply | JobError:
    """Mistral reports a generation that failed midway as a 200 whose finish
    reason is `error`: a retryable provider fault, not an answer."""
    if isinstance(reply, ProviderReply) and reply.completion.provider_finish_reason == "error":
        return malformed(200, "Mistral ended the answer with finish_reason `error`")
    return reply
