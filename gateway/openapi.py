"""`GET /openapi.json`: the gateway's API as OpenAPI 3.1. Request schemas
are generated from the msgspec types that decode them, so the document
cannot drift from what the gateway accepts; response schemas are written
here, as small as the shapes they promise."""

from __future__ import annotations

import functools
from typing import Any

import msgspec

from modelyard import admin
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
    "File": _object(
        ["id", "object", "bytes", "created_at", "filename", "purpose"],
        id=_STRING,
        object={"const": "file"},
        bytes=_INT,
        created_at=_INT,
        filename=_STRING,
        purpose=_STRING,
    ),
    "Deleted": _object(
        ["id", "object", "deleted"], id=_STRING, object=_STRING, deleted={"type": "boolean"}
    ),
    "Batch": _object(
        ["id", "object", "endpoint", "input_file_id", "status", "request_counts", "modelyard"],
        id=_STRING,
        object={"const": "batch"},
        endpoint=_STRING,
        input_file_id=_STRING,
        status={
            "enum": [
                "validating",
                "in_progress",
                "finalizing",
                "completed",
                "failed",
                "cancelling",
                "cancelled",
            ]
        },
        output_file_id={"type": ["string", "null"]},
        error_file_id={"type": ["string", "null"]},
        request_counts=_object(
            ["total", "completed", "failed"], total=_INT, completed=_INT, failed=_INT
        ),
        modelyard=_object(["cost"], cost=_STRING),
    ),
    "BatchList": _object(
        ["object", "data", "has_more"],
        object={"const": "list"},
        data={"type": "array", "items": {"$ref": _REF.format(name="Batch")}},
        has_more={"type": "boolean"},
    ),
    "Rows": _object(
        ["object", "data"],
        object={"const": "list"},
        data={"type": "array", "items": {"type": "object"}},
    ),
    "Upload": _object(
        ["file", "purpose"],
        file={"type": "string", "format": "binary"},
        purpose={"const": "batch"},
    ),
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


_ADMIN_BODIES = (admin.CreateKey, admin.RotateKey, admin.DecideModel, admin.SetBudget)
_ID = [{"name": "id", "in": "path", "required": True, "schema": _STRING}]


def _path_params(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "path", "required": True, "schema": _STRING} for n in names]


def _op(
    summary: str, ok: str, *errors: int, body: str | None = None, **extra: Any
) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "security": _BEARER,
        "responses": _answer(ok, "OpenAIError", 401, *errors),
        **extra,
    }
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json(body)}
    return operation


def _batch_paths() -> dict[str, Any]:
    file_id, batch_id = _path_params("file_id"), _path_params("batch_id")
    upload = {"multipart/form-data": {"schema": {"$ref": _REF.format(name="Upload")}}}
    return {
        "/v1/files": {
            "post": _op(
                "Upload a Batch API input file (JSONL, purpose `batch`)",
                "File",
                400,
                413,
                requestBody={"required": True, "content": upload},
            )
        },
        "/v1/files/{file_id}": {
            "get": _op("A file", "File", 404, parameters=file_id),
            "delete": _op("Delete a file", "Deleted", 404, parameters=file_id),
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "summary": "A file's content",
                "security": _BEARER,
                "parameters": file_id,
                "responses": {
                    "200": {
                        "description": "the file",
                        "content": {"application/jsonl": {"schema": _STRING}},
                    },
                    "401": {"description": "an error", "content": _json("OpenAIError")},
                    "404": {"description": "an error", "content": _json("OpenAIError")},
                },
            }
        },
        "/v1/batches": {
            "post": _op(
                "Create a batch from an uploaded file", "Batch", 400, 404, body="BatchRequest"
            ),
            "get": _op(
                "Batches, newest first",
                "BatchList",
                400,
                parameters=[
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                    },
                    {"name": "after", "in": "query", "schema": _STRING},
                ],
            ),
        },
        "/v1/batches/{batch_id}": {"get": _op("A batch", "Batch", 404, parameters=batch_id)},
        "/v1/batches/{batch_id}/cancel": {
            "post": _op("Cancel a batch", "Batch", 404, parameters=batch_id)
        },
    }


def _admin_paths() -> dict[str, Any]:
    guarded = (400, 403, 404)
    key, model = _path_params("key_id"), _path_params("model")
    scope = [
        {
            "name": "scope",
            "in": "path",
            "required": True,
            "schema": {"enum": ["global", "team", "project", "user", "key"]},
        }
    ]
    subject = [*scope, *_path_params("subject")]
    return {
        "/admin/keys": {
            "post": _op(
                "Issue a key (its secret is shown once)", "Rows", *guarded, body="CreateKey"
            ),
            "get": _op("Keys, never their secrets", "Rows", *guarded),
        },
        "/admin/keys/{key_id}/rotate": {
            "post": _op("A new secret for a key", "Rows", *guarded, parameters=key)
        },
        "/admin/keys/{key_id}/revoke": {
            "post": _op("Revoke a key now", "Rows", *guarded, parameters=key)
        },
        "/admin/models": {"get": _op("Models and their approval", "Rows", *guarded)},
        "/admin/models/history": {"get": _op("Every approval and revocation", "Rows", *guarded)},
        "/admin/models/{model}/approve": {
            "post": _op("Approve a model", "Rows", *guarded, parameters=model, body="DecideModel")
        },
        "/admin/models/{model}/revoke": {
            "post": _op(
                "Revoke a model's approval", "Rows", *guarded, parameters=model, body="DecideModel"
            )
        },
        "/admin/budgets": {
            "get": _op("Budgets with spend, reserved and remaining", "Rows", *guarded)
        },
        "/admin/budgets/{scope}": {
            "get": _op("The global budget", "Rows", *guarded, parameters=scope),
            "put": _op(
                "Set the global budget", "Rows", *guarded, parameters=scope, body="SetBudget"
            ),
        },
        "/admin/budgets/{scope}/{subject}": {
            "get": _op("One budget", "Rows", *guarded, parameters=subject),
            "put": _op("Set a budget", "Rows", *guarded, parameters=subject, body="SetBudget"),
        },
    }


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
            **_batch_paths(),
            **_admin_paths(),
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
