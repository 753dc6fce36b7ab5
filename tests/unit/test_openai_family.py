"""OpenAI, Azure and Mistral adapters: pure translation, no network."""

from __future__ import annotations

import json

import pytest

from modelyard.config import Deployment
from schemas.chat import ChatRequest, Message
from schemas.errors import ErrorKind
from workers.providers import PROVIDERS, AdapterError
from workers.providers.base import HttpResponse, ProviderReply, retry_after_s
from workers.providers.openai import OpenAIStreamDecoder

OPENAI = PROVIDERS["openai"]
AZURE = PROVIDERS["azure"]
MISTRAL = PROVIDERS["mistral"]


def deployment(provider: str = "openai", **options: object) -> Deployment:
    return Deployment(
        provider=provider,
        model="gpt-4o-mini",
        pool="p",
        api_base="http://upstream/v1",
        name="d",
        options=dict(options),
    )


def request(**params: object) -> ChatRequest:
    return ChatRequest(model="fast", messages=[Message(role="user", content="hi")], **params)  # type: ignore[arg-type]


def response(status: int, body: object, **headers: str) -> HttpResponse:
    return HttpResponse(status=status, headers=headers, body=json.dumps(body).encode())


def test_openai_request_uses_deployment_model_and_bearer_key() -> None:
    built = OPENAI.build_request(request(temperature=0.5, seed=7), deployment(), "sk-test")

    assert built.url == "http://upstream/v1/chat/completions"
    assert built.headers["authorization"] == "Bearer sk-test"
    body = json.loads(built.body)
    assert (body["model"], body["temperature"], body["seed"]) == ("gpt-4o-mini", 0.5, 7)


def test_streamed_request_asks_for_usage() -> None:
    body = json.loads(OPENAI.build_request(request(stream=True), deployment(), None).body)

    assert body["stream_options"] == {"include_usage": True}


def test_quirks_rename_drop_and_refuse() -> None:
    d = deployment(rename_params={"max_completion_tokens": "max_tokens"}, drop_params=["user"])
    body = json.loads(
        OPENAI.build_request(request(max_completion_tokens=5, user="u"), d, None).body
    )

    assert body["max_tokens"] == 5
    assert "user" not in body
    assert "max_completion_tokens" not in body
    with pytest.raises(AdapterError) as refused:
        OPENAI.build_request(request(seed=1), deployment(unsupported=["seed"]), None)
    assert (refused.value.error.kind, refused.value.error.field) == (
        ErrorKind.BAD_REQUEST,
        "$.request.seed",
    )


def test_openai_completion_normalized() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 1200,
            "completion_tokens": 300,
            "total_tokens": 1500,
            "prompt_tokens_details": {"cached_tokens": 1024},
            "completion_tokens_details": {"reasoning_tokens": 100},
        },
    }
    reply = OPENAI.parse_response(response(200, body, **{"x-request-id": "req-9"}))

    assert isinstance(reply, ProviderReply)
    assert reply.request_id == "req-9"
    assert reply.completion.finish_reason == "tool_calls"
    assert reply.completion.tool_calls is not None
    assert reply.completion.tool_calls[0].function.name == "f"
    u = reply.usage
    expected = (1200, 300, 1024, 100)
    assert expected == (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.reasoning_tokens)
    assert reply.raw_usage == body["usage"]


@pytest.mark.parametrize(
    ("status", "code", "headers", "kind", "retryable", "retry_after"),
    [
        (429, "rate_limit_exceeded", {"retry-after": "2"}, ErrorKind.RATE_LIMITED, True, 2.0),
        (429, "rate_limit_exceeded", {"retry-after-ms": "250"}, ErrorKind.RATE_LIMITED, True, 0.25),
        (429, "insufficient_quota", {}, ErrorKind.RATE_LIMITED, False, None),
        (400, "context_length_exceeded", {}, ErrorKind.CONTEXT_WINDOW_EXCEEDED, False, None),
        (400, "content_policy_violation", {}, ErrorKind.CONTENT_POLICY, False, None),
        (400, None, {}, ErrorKind.BAD_REQUEST, False, None),
        (401, "invalid_api_key", {}, ErrorKind.AUTH, False, None),
        (403, None, {}, ErrorKind.AUTH, False, None),
        (404, "model_not_found", {}, ErrorKind.NOT_FOUND, False, None),
        (500, None, {}, ErrorKind.SERVER_ERROR, True, None),
        (503, None, {}, ErrorKind.OVERLOADED, True, None),
    ],
)
def test_openai_errors_map_to_taxonomy(
    status: int,
    code: str | None,
    headers: dict[str, str],
    kind: ErrorKind,
    retryable: bool,
    retry_after: float | None,
) -> None:
    body = {"error": {"message": "nope", "type": "x", "param": None, "code": code}}
    error = OPENAI.parse_response(response(status, body, **headers))

    assert not isinstance(error, ProviderReply)
    assert (error.kind, error.retryable, error.retry_after_s, error.provider_status) == (
        kind,
        retryable,
        retry_after,
        status,
    )


def test_malformed_200_is_a_retryable_server_error() -> None:
    error = OPENAI.parse_response(HttpResponse(status=200, headers={}, body=b'{"id": "x", "cho'))

    assert not isinstance(error, ProviderReply)
    assert (error.kind, error.retryable) == (ErrorKind.SERVER_ERROR, True)


def test_retry_after_http_date() -> None:
    assert retry_after_s({"retry-after": "Thu, 01 Jan 2026 00:00:10 GMT"}, now=1767225600.0) == 10.0


def sse(chunk: dict[str, object]) -> str:
    return json.dumps(chunk)


def test_stream_reassembles_text_tools_and_usage() -> None:
    decoder = OpenAIStreamDecoder("req-1")
    base = {"id": "c1", "model": "m", "created": 1}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
        {**base, "choices": [{"index": 0, "delta": {"content": "lo"}}]},
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "f", "arguments": '{"a"'},
                            }
                        ]
                    },
                }
            ],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]},
                }
            ],
        },
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        {
            **base,
            "choices": [],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        },
    ]
    deltas = [d for e in events for d in decoder.feed(None, sse(e))]
    decoder.feed(None, "[DONE]")
    reply = decoder.finish()

    assert [d.content for d in deltas if d.content] == ["Hel", "lo"]
    assert deltas[-1].finish_reason == "tool_calls"
    assert isinstance(reply, ProviderReply)
    assert reply.completion.content == "Hello"
    assert reply.completion.tool_calls is not None
    call = reply.completion.tool_calls[0]
    assert (call.id, call.function.name, call.function.arguments) == ("call_a", "f", '{"a": 1}')
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (10, 4)
    assert reply.request_id == "req-1"


def test_stream_error_event_and_cut_off_stream() -> None:
    errored = OpenAIStreamDecoder(None)
    errored.feed(None, sse({"error": {"message": "boom", "type": "server_error", "code": None}}))
    cut = OpenAIStreamDecoder(None)
    cut.feed(
        None, sse({"id": "c", "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]})
    )

    first, second = errored.finish(), cut.finish()
    assert not isinstance(first, ProviderReply)
    assert not isinstance(second, ProviderReply)
    assert (first.kind, second.kind) == (ErrorKind.SERVER_ERROR, ErrorKind.SERVER_ERROR)
    assert cut.usage_so_far() is None


def test_azure_url_and_key_header() -> None:
    d = deployment("azure", api_version="2024-06-01", azure_deployment="prod mini")
    built = AZURE.build_request(request(), d, "az-key")

    expected = (
        "http://upstream/v1/openai/deployments/prod%20mini/chat/completions?api-version=2024-06-01"
    )
    assert built.url == expected
    assert built.headers["api-key"] == "az-key"
    assert "authorization" not in built.headers


def test_azure_needs_a_resource_url() -> None:
    d = Deployment(provider="azure", model="m", pool="p", name="d")

    assert AZURE.check_deployment(d) is not None
    assert OPENAI.check_deployment(d) is None


def test_mistral_renames_seed_and_drops_user() -> None:
    body = json.loads(
        MISTRAL.build_request(
            request(seed=3, user="u", stream=True), deployment("mistral"), "k"
        ).body
    )

    assert body["random_seed"] == 3
    assert "seed" not in body
    assert "user" not in body
    assert "stream_options" not in body


def test_mistral_errors_and_finish_reasons() -> None:
    validation = MISTRAL.parse_response(
        response(422, {"detail": [{"msg": "extra fields not permitted"}]})
    )
    limited = MISTRAL.parse_response(
        response(
            429,
            {
                "object": "error",
                "message": "Requests rate limit exceeded",
                "type": "rate_limited",
                "code": "1300",
            },
        )
    )
    body = {
        "id": "m1",
        "model": "mistral-small",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "cut"},
                "finish_reason": "model_length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    reply = MISTRAL.parse_response(response(200, body))
    failed = MISTRAL.parse_response(
        response(200, {**body, "choices": [{**body["choices"][0], "finish_reason": "error"}]})
    )  # type: ignore[dict-item]

    assert not isinstance(validation, ProviderReply)
    assert not isinstance(limited, ProviderReply)
    assert (validation.kind, limited.kind) == (ErrorKind.BAD_REQUEST, ErrorKind.RATE_LIMITED)
    assert isinstance(reply, ProviderReply)
    assert (reply.completion.finish_reason, reply.completion.provider_finish_reason) == (
        "length",
        "model_length",
    )
    assert not isinstance(failed, ProviderReply)
    assert failed.kind == ErrorKind.SERVER_ERROR


def test_cache_markers_go_to_anthropic_and_not_to_openai() -> None:
    from schemas.chat import CacheControl, TextPart  # noqa: PLC0415

    marked = ChatRequest(
        model="fast",
        messages=[
            Message(role="system", content=[TextPart("long policy", cache_control=CacheControl())]),
            Message(role="user", content="question"),
        ],
    )
    openai_body = json.loads(OPENAI.build_request(marked, deployment(), None).body)
    anthropic_body = json.loads(
        PROVIDERS["anthropic"].build_request(marked, deployment("anthropic"), "k").body
    )

    assert openai_body["messages"][0]["content"] == [{"type": "text", "text": "long policy"}]
    assert anthropic_body["system"] == [
        {"type": "text", "text": "long policy", "cache_control": {"type": "ephemeral"}}
    ]


def test_rate_limit_headers_parsed() -> None:
    from workers.providers.base import duration_s  # noqa: PLC0415

    openai = OPENAI.rate_limits(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "499",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "6m0s",
        }
    )
    anthropic = PROVIDERS["anthropic"].rate_limits(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2999-01-01T00:00:00Z",
            "retry-after": "3",
        }
    )

    assert openai is not None
    assert (openai.limit_requests, openai.remaining_requests, openai.reset_requests_s) == (
        500,
        499,
        0.12,
    )
    assert (openai.limit_tokens, openai.remaining_tokens, openai.reset_tokens_s) == (
        30000,
        29000,
        360.0,
    )
    assert anthropic is not None
    assert (anthropic.limit_requests, anthropic.remaining_requests, anthropic.retry_after_s) == (
        50,
        49,
        3.0,
    )
    assert anthropic.reset_requests_s is not None
    assert anthropic.reset_requests_s > 0
    assert OPENAI.rate_limits({}) is None
    assert (duration_s("1h2m3.5s"), duration_s("soon"), duration_s(None)) == (3723.5, None, None)


def test_params_without_equivalent_are_named_not_silently_dropped() -> None:
    job = request(seed=3, user="u", parallel_tool_calls=False)

    assert PROVIDERS["anthropic"].ignored(job, deployment("anthropic")) == ["seed"]
    assert PROVIDERS["gemini"].ignored(job, deployment("gemini")) == ["parallel_tool_calls", "user"]
    assert MISTRAL.ignored(job, deployment("mistral")) == ["user"]
    assert OPENAI.ignored(job, deployment()) == []
    assert OPENAI.ignored(job, deployment(drop_params=["user"])) == ["user"]


@pytest.mark.parametrize(
    ("adapter", "status", "body", "kind"),
    [
        (
            "openai",  # vLLM: no code, the wording says it
            400,
            {
                "error": {
                    "message": "This model's maximum context length is 8192 tokens.",
                    "code": None,
                }
            },
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
        ),
        (
            "mistral",
            400,
            {
                "object": "error",
                "message": "Prompt contains 9000 tokens and 0 draft tokens, too large for model "
                "with 8192 maximum context length",
                "type": "invalid_request_error",
            },
            ErrorKind.CONTEXT_WINDOW_EXCEEDED,
        ),
        (
            "mistral",
            400,
            {"object": "error", "message": "Prompt was blocked by the moderation policy."},
            ErrorKind.CONTENT_POLICY,
        ),
        ("mistral", 400, {"object": "error", "message": "Invalid model: x"}, ErrorKind.BAD_REQUEST),
    ],
)
def test_refusals_recognised_by_wording(
    adapter: str, status: int, body: dict[str, object], kind: ErrorKind
) -> None:
    error = PROVIDERS[adapter].parse_response(response(status, body))

    assert not isinstance(error, ProviderReply)
    assert error.kind == kind


def test_message_names_and_image_detail_are_reported_where_unmapped() -> None:
    from schemas.chat import ImagePart, ImageURL  # noqa: PLC0415

    job = ChatRequest(
        model="fast",
        messages=[
            Message(
                role="user",
                name="ann",
                content=[ImagePart(ImageURL(url="https://x/y.png", detail="high"))],
            )
        ],
    )
    expected = ["messages[].name", "image_url.detail"]

    assert PROVIDERS["anthropic"].ignored(job, deployment("anthropic")) == expected
    assert PROVIDERS["gemini"].ignored(job, deployment("gemini")) == expected
    assert OPENAI.ignored(job, deployment()) == []


@pytest.mark.parametrize(("finish", "ok"), [("error", False), ("stop", True)])
def test_a_mistral_stream_ending_in_error_is_a_failure_not_an_answer(finish: str, ok: bool) -> None:
    decoder = MISTRAL.stream_decoder("req-m")
    base = {"id": "m1", "model": "mistral-small", "created": 1}
    for event in (
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "par"}}]},
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        },
    ):
        decoder.feed(None, sse(event))
    decoder.feed(None, "[DONE]")
    outcome = decoder.finish()

    assert isinstance(outcome, ProviderReply) is ok
    if not ok:
        assert not isinstance(outcome, ProviderReply)
        assert (outcome.kind, outcome.retryable) == (ErrorKind.SERVER_ERROR, True)
        # What the provider counted is still known, so the ledger records it.
        assert decoder.usage_so_far() is not None
