"""`GET /openapi.json`: the gateway's API as OpenAPI 3.1. Request schemas
are generated from the msgspec types that decode them, so the document
cannot drift from what the gateway accepts; response schemas are written
here, as small as the shapes they promise."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from modelyard.anthropic_format import MessagesRequest
from schemas.chat import ChatRequest

_REF = "#/components/schemas/{name}"


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


_STRING = {"type": "string"}
_INT = {"type": "integer"}

_RESPONSES: dict[str, Any] = {
    "OpenAIError": _object(
        ["error"],
        error=_object(
            ["message", "type"],
            message=_STRING,
            type=_STRING,
            param={"type": ["string", "null"]},
            code={"type": ["string", "null"]},
        ),
    ),
    "AnthropicError": _object(
        ["type", "error"],
        type={"const": "error"},
        error=_object(["type", "message"], type=_STRING, message=_STRING),
    ),
    "ChatCompletion": _object(
        ["id", "object", "created", "model", "choices", "usage"],
        id=_STRING,
        object={"const": "chat.completion"},
        created=_INT,
        model=_STRING,
        choices={
            "type": "array",
            "items": _object(
                ["index", "message", "finish_reason"],
                index=_INT,
                message=_object(["role"], role={"const": "assistant"}),
                finish_reason=_STRING,
            ),
        },
        usage=_object(
            ["prompt_tokens", "completion_tokens", "total_tokens"],
            prompt_tokens=_INT,
            completion_tokens=_INT,
            total_tokens=_INT,
        ),
    ),
    "Message": _object(
        ["id", "type", "role", "model", "content", "stop_reason", "usage"],
        id=_STRING,
        type={"const": "message"},
        role={"const": "assistant"},
        model=_STRING,
        content={"type": "array", "items": _object(["type"], type=_STRING)},
        stop_reason={"type": ["string", "null"]},
        usage=_object(["input_tokens", "output_tokens"], input_tokens=_INT, output_tokens=_INT),
    ),
    "Model": _object(
        ["id", "object", "created", "owned_by"],
        id=_STRING,
        object={"const": "model"},
        created=_INT,
        owned_by=_STRING,
    ),
    "ModelList": _object(
        ["object", "data"],
        object={"const": "list"},
        data={"type": "array", "items": {"$ref": _REF.format(name="Model")}},
    ),
    "Status": _object(["status"], status=_STRING),
}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": _REF.format(name=name)}}}


def _answer(ok: str, error: str, *statuses: int) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": "the answer", "content": _json(ok)}}
    for status in statuses:
        answers[str(status)] = {"description": "an error", "content": _json(error)}
    return answers


_COMPLETION_ERRORS = (400, 401, 403, 404, 413, 429, 502, 503, 504)
_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _completion_answers(ok: str, error: str) -> dict[str, Any]:
    answers = _answer(ok, error, *_COMPLETION_ERRORS)
    answers["200"]["content"]["text/event-stream"] = {"schema": {"type": "string"}}
    return answers


@functools.cache
def document() -> dict[str, Any]:
    """The OpenAPI document (built once)."""
    _, requests = msgspec.json.schema_components([ChatRequest, MessagesRequest], ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "modelyard gateway", "version": "1"},
        "paths": {
            "/v1/chat/completions": {
                "post": {
                    "summary": "A chat completion (OpenAI's API), whole or streamed",
                    "security": _BEARER,
                    "requestBody": {"required": True, "content": _json("ChatRequest")},
                    "responses": _completion_answers("ChatCompletion", "OpenAIError"),
                }
            },
            "/v1/messages": {
                "post": {
                    "summary": "A message (Anthropic's Messages API), whole or streamed",
                    "security": [{"apiKey": []}, *_BEARER],
                    "requestBody": {"required": True, "content": _json("MessagesRequest")},
                    "responses": _completion_answers("Message", "AnthropicError"),
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The models this key may use",
                    "security": _BEARER,
                    "responses": _answer("ModelList", "OpenAIError", 401),
                }
            },
            "/v1/models/{model}": {
                "get": {
                    "summary": "One model this key may use",
                    "security": _BEARER,
                    "parameters": [
                        {"name": "model", "in": "path", "required": True, "schema": _STRING}
                    ],
                    "responses": _answer("Model", "OpenAIError", 401, 404),
                }
            },
            "/healthz": {"get": {"summary": "Alive", "responses": _answer("Status", "Status")}},
            "/readyz": {
                "get": {
                    "summary": "Broker and database reachable, topology declared",
                    "responses": _answer("Status", "Status", 503),
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "text format",
                            "content": {"text/plain": {"schema": _STRING}},
                        }
                    },
                }
            },
        },
        "components": {
            "schemas": {**requests, **_RESPONSES},
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
            },
        },
    }
