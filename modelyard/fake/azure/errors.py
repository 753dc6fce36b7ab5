"""Azure OpenAI's error responses.

Azure's own gateway answers with ``{"error": {"code", "message"}}`` (a wrong
key, an unknown route, a 429); errors from the model service keep OpenAI's
shape (``modelyard.fake.openai.errors``), and a content-filter hit adds
Azure's ``innererror`` to it.
"""

from __future__ import annotations

import math

import msgspec

from modelyard.fake.azure.wire import ErrorBody, ErrorDetail
from modelyard.fake.dialect import WireError
from modelyard.fake.openai.errors import ApiError

_encode = msgspec.json.Encoder().encode
_SAFE = {"filtered": False, "severity": "safe"}
_CONTENT_FILTER = {
    "error": {
        "message": "The response was filtered due to the prompt triggering Azure OpenAI's content"
        " management policy. Please modify your prompt and retry. To learn more about our content"
        " filtering policies please read our documentation:"
        " https://go.microsoft.com/fwlink/?linkid=2198766",
        "type": None,
        "param": "prompt",
        "code": "content_filter",
        "status": 400,
        "innererror": {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_result": {
                "hate": _SAFE,
                "jailbreak": {"filtered": False, "detected": False},
                "self_harm": _SAFE,
                "sexual": _SAFE,
                "violence": {"filtered": True, "severity": "medium"},
            },
        },
    }
}
CONTENT_FILTER = _encode(_CONTENT_FILTER)


def error(status: int, code: str, message: str, retry_after_s: float | None = None) -> WireError:
    """An error from Azure's gateway."""
    return WireError(status, _encode(ErrorBody(ErrorDetail(code, message))), retry_after_s)


def unauthorized() -> WireError:
    return error(
        401,
        "401",
        "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide"
        " a valid key for an active subscription and use a correct regional API endpoint for"
        " your resource.",
    )


def resource_not_found() -> WireError:
    """What Azure answers when the ``api-version`` query parameter is missing."""
    return error(404, "404", "Resource not found")


def unsupported_version() -> WireError:
    return error(400, "BadRequest", "API version not supported")


def rate_limited(api_version: str, retry_after_s: float) -> WireError:
    return error(
        429,
        "429",
        "Requests to the ChatCompletions_Create Operation under Azure OpenAI API version"
        f" {api_version} have exceeded call rate limit of your current OpenAI S0 pricing tier."
        f" Please retry after {math.ceil(retry_after_s)} seconds. Please go here:"
        " https://aka.ms/oai/quotaincrease if you would like to further increase the default"
        " rate limit.",
        retry_after_s,
    )


def content_filter() -> WireError:
    return WireError(400, CONTENT_FILTER)


def server_error() -> WireError:
    """The model service's 500, in OpenAI's shape with Azure's wording."""
    return ApiError(
        500,
        "The server had an error processing your request. Sorry about that! You can retry your"
        " request, or contact us through an Azure support request at:"
        " https://go.microsoft.com/fwlink/?linkid=2213926 if you keep seeing this error.",
        type="server_error",
    ).wire()
