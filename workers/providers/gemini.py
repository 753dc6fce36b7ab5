"""Google Gemini API (`models/{model}:generateContent`), translated to and
from OpenAI's chat shape.

Choices where the two APIs do not line up, so callers know what to expect:

- `system` and `developer` messages, wherever they appear, are hoisted into
  `systemInstruction`. Roles become `user` and `model`; consecutive turns of
  the same role are merged, and `tool` messages become `functionResponse`
  parts of a user turn.
- Gemini gives function calls no ids (or only sometimes): a call without one
  gets the deterministic id `call_<index>_<name>`, `index` counting calls in
  the reply. Tool results are matched back to their call by name, looked up
  from the earlier assistant tool call with the same id.
- A `functionResponse` must be an object: a tool result that is a JSON object
  is sent as is, any other JSON value or plain text as `{"result": value}`.
- Gemini 3 rejects replayed function calls without the `thoughtSignature`
  it attached to them, and OpenAI's tool calls have nowhere to keep one. The
  first function call of each replayed model turn therefore carries Google's
  documented placeholder `skip_thought_signature_validator`; set the
  deployment's `options["thought_signature_placeholder"]` to another value,
  or to null to send none.
- JSON Schemas (tool parameters and `response_format` json_schema) are
  reduced to the OpenAPI subset Gemini's `Schema` accepts: local `$ref`s
  (`#/$defs/...`, `#/definitions/...`) are inlined; `type: [T, "null"]`
  becomes `type: T, nullable: true`; `oneOf` becomes `anyOf`; a string
  `const` becomes a one-value `enum`; every other keyword (`$schema`, `$id`,
  `$defs`, `additionalProperties`, `allOf`, `not`, `examples`, `const` on
  non-strings, `exclusiveMinimum`, `patternProperties`, `strict`, ...) is
  dropped. A tool whose parameters are an object without properties is sent
  without `parameters`, which Gemini requires for argument-less functions.
- `json_object` is `responseMimeType: application/json` without a schema.
- `parallel_tool_calls`, `user`, message `name` and image `detail` have no
  Gemini equivalent and are left out, each named by `ignored()` and reported
  as a warning on the result; `seed` is passed through.
- An http(s) image URL is sent as `fileData` with a MIME type guessed from
  the URL's extension (image/jpeg when there is none).
- The `responseId` serves as the reply's request id when the transport has
  none; Gemini sends no creation time, so `Completion.created` is 0.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from modelyard.config import Deployment
from schemas.chat import (
    ChatRequest,
    Content,
    ImagePart,
    JsonObjectFormat,
    JsonSchemaFormat,
    Message,
    TextPart,
    ToolCall,
)
from schemas.chat import FunctionCall as OpenAIFunctionCall
from schemas.errors import ErrorKind, JobError, job_error
from schemas.results import Completion, FinishReason, RateLimits, ToolCallDelta, Usage
from workers.providers.base import (
    AdapterError,
    HttpRequest,
    HttpResponse,
    ProviderReply,
    StreamDelta,
    error_for_status,
    malformed,
    options_problem,
    retry_after_s,
    set_params,
)
from workers.providers.translate import (
    base64_data_uri,
    refuse,
    tool_arguments,
    unmapped_message_fields,
)

DEFAULT_API_BASE = "https://generativelanguage.googleapis.com"
THOUGHT_SIGNATURE_PLACEHOLDER = "skip_thought_signature_validator"
_DEFAULT_IMAGE_TYPE = "image/jpeg"

_FINISH: dict[str, FinishReason] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
}

_MODES: dict[str, Literal["AUTO", "ANY", "NONE"]] = {
    "auto": "AUTO",
    "required": "ANY",
    "none": "NONE",
}

_KIND_BY_STATUS: dict[str, ErrorKind] = {
    "RESOURCE_EXHAUSTED": ErrorKind.RATE_LIMITED,
    "INVALID_ARGUMENT": ErrorKind.BAD_REQUEST,
    "FAILED_PRECONDITION": ErrorKind.BAD_REQUEST,
    "OUT_OF_RANGE": ErrorKind.BAD_REQUEST,
    "UNAUTHENTICATED": ErrorKind.AUTH,
    "PERMISSION_DENIED": ErrorKind.AUTH,
    "NOT_FOUND": ErrorKind.NOT_FOUND,
    "INTERNAL": ErrorKind.SERVER_ERROR,
    "UNKNOWN": ErrorKind.SERVER_ERROR,
    "UNAVAILABLE": ErrorKind.OVERLOADED,
    "DEADLINE_EXCEEDED": ErrorKind.TIMEOUT,
}
_TOKEN_LIMIT = re.compile(
    r"token count.*exceeds|exceeds the maximum number of tokens|too many tokens", re.IGNORECASE
)
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)s$")

# The keywords of Gemini's `Schema` (an OpenAPI 3.0 subset); all else is dropped.
_SCHEMA_KEYS = frozenset(
    {
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    }
)
# Rebuilt recursively below rather than copied (a list-valued `items` is dropped).
_NESTED_KEYS = frozenset({"type", "anyOf", "properties", "items"})
_MAX_DEPTH = 64


# --- wire types (requests and replies share the content types) -------------


class _Blob(msgspec.Struct, rename="camel"):
    mime_type: str
    data: str


class _FileData(msgspec.Struct, rename="camel"):
    mime_type: str
    file_uri: str


class _FunctionCall(msgspec.Struct, omit_defaults=True):
    name: str
    args: dict[str, Any] | None = None  # Gemini may leave it out for no arguments
    id: str | None = None


class _FunctionResponse(msgspec.Struct):
    name: str
    response: dict[str, Any]


class _Part(msgspec.Struct, rename="camel", omit_defaults=True):
    text: str | None = None
    inline_data: _Blob | None = None
    file_data: _FileData | None = None
    function_call: _FunctionCall | None = None
    function_response: _FunctionResponse | None = None
    thought: bool | None = None
    thought_signature: str | None = None


_Role = Literal["user", "model"]


class _Content(msgspec.Struct, omit_defaults=True):
    parts: list[_Part] = msgspec.field(default_factory=list)
    role: str | None = None


class _FunctionDeclaration(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class _Tool(msgspec.Struct, rename="camel"):
    function_declarations: list[_FunctionDeclaration]


class _FunctionCallingConfig(msgspec.Struct, rename="camel", omit_defaults=True):
    mode: Literal["AUTO", "ANY", "NONE"]
    allowed_function_names: list[str] | None = None


class _ToolConfig(msgspec.Struct, rename="camel"):
    function_calling_config: _FunctionCallingConfig


class _GenerationConfig(msgspec.Struct, rename="camel", omit_defaults=True):
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    stop_sequences: list[str] | None = None
    seed: int | None = None
    response_mime_type: str | None = None
    response_schema: dict[str, Any] | None = None


class _GenerateContentRequest(msgspec.Struct, rename="camel", omit_defaults=True):
    contents: list[_Content]
    system_instruction: _Content | None = None
    tools: list[_Tool] | None = None
    tool_config: _ToolConfig | None = None
    generation_config: _GenerationConfig | None = None


class _Candidate(msgspec.Struct, rename="camel"):
    content: _Content | None = None
    finish_reason: str | None = None


class _PromptFeedback(msgspec.Struct, rename="camel"):
    block_reason: str | None = None
    block_reason_message: str | None = None


class _ErrorBody(msgspec.Struct):
    code: int | None = None
    message: str = ""
    status: str = ""
    details: list[dict[str, Any]] = msgspec.field(default_factory=list)


class _GenerateContentResponse(msgspec.Struct, rename="camel"):
    candidates: list[_Candidate] = msgspec.field(default_factory=list)
    prompt_feedback: _PromptFeedback | None = None
    usage_metadata: dict[str, Any] | None = None
    response_id: str | None = None
    model_version: str | None = None
    error: _ErrorBody | None = None  # only in a stream: an error after HTTP 200


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody


_encoder = msgspec.json.Encoder()
_response_decoder = msgspec.json.Decoder(_GenerateContentResponse)
_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)


# --- JSON Schema to Gemini's Schema ----------------------------------------


def _refuse(message: str, field: str | None = None) -> AdapterError:
    """A request Gemini cannot express: the caller's fault, not retryable."""
    return refuse("gemini", message, field)


def _resolve_ref(ref: str, root: dict[str, Any], field: str) -> dict[str, Any]:
    """The schema a local `#/$defs/Name` (or `#/definitions/Name`) points at."""
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            target = root.get(prefix[2:-1], {}).get(ref.removeprefix(prefix))
            if isinstance(target, dict):
                return target
    raise _refuse(f"schema reference {ref} cannot be resolved", field)


def _schema_type(node: dict[str, Any], out: dict[str, Any]) -> None:
    """JSON Schema's `type: [T, "null"]` as OpenAPI's `type: T, nullable: true`."""
    kind = node.get("type")
    if not isinstance(kind, list):
        if kind is not None:
            out["type"] = kind
        return
    kinds = [k for k in kind if k != "null"]
    if len(kinds) < len(kind):
        out["nullable"] = True
    if len(kinds) == 1:
        out["type"] = kinds[0]
    elif kinds:
        out["anyOf"] = [{"type": k} for k in kinds]


def gemini_schema(
    node: dict[str, Any], field: str, root: dict[str, Any] | None = None, depth: int = 0
) -> dict[str, Any]:
    """A JSON Schema reduced to the OpenAPI subset Gemini accepts (see the
    module docstring for what is rewritten and what is dropped)."""
    root = node if root is None else root
    if depth > _MAX_DEPTH:
        raise _refuse(
            f"schemas recursive or nested over {_MAX_DEPTH} deep are not supported", field
        )
    if isinstance(ref := node.get("$ref"), str):
        return gemini_schema(_resolve_ref(ref, root, field), field, root, depth + 1)
    out = {k: v for k, v in node.items() if k in _SCHEMA_KEYS and k not in _NESTED_KEYS}
    _schema_type(node, out)
    if isinstance(node.get("const"), str):
        out["enum"] = [node["const"]]
    alternatives = node.get("anyOf") or node.get("oneOf")
    if isinstance(alternatives, list):
        out["anyOf"] = [gemini_schema(s, field, root, depth + 1) for s in alternatives]
    if isinstance(props := node.get("properties"), dict):
        out["properties"] = {k: gemini_schema(s, field, root, depth + 1) for k, s in props.items()}
    if isinstance(items := node.get("items"), dict):
        out["items"] = gemini_schema(items, field, root, depth + 1)
    return out


# --- request translation ---------------------------------------------------


def _inline_image(url: str, field: str) -> _Part:
    """`data:<type>;base64,<data>` as `inlineData`; other encodings are refused."""
    mime_type, data = base64_data_uri(url, field, "gemini")
    return _Part(inline_data=_Blob(mime_type=mime_type, data=data))


def _image_part(part: ImagePart, field: str) -> _Part:
    """An image inline (data: URI) or by reference (`fileData` with a guessed type)."""
    url = part.image_url.url
    if url.startswith("data:"):
        return _inline_image(url, field)
    guessed, _ = mimetypes.guess_type(urlsplit(url).path)
    mime_type = guessed if guessed and guessed.startswith("image/") else _DEFAULT_IMAGE_TYPE
    return _Part(file_data=_FileData(mime_type=mime_type, file_uri=url))


def _content_parts(content: Content | None, field: str, *, images: bool) -> list[_Part]:
    """Text and image parts for one message; empty text is dropped."""
    if content is None or isinstance(content, str):
        return [_Part(text=content)] if content else []
    parts: list[_Part] = []
    for j, item in enumerate(content):
        if isinstance(item, ImagePart):
            if not images:
                raise _refuse("images are only accepted in user messages", f"{field}[{j}]")
            parts.append(_image_part(item, f"{field}[{j}]"))
        elif item.text:
            parts.append(_Part(text=item.text))
    return parts


def _model_parts(message: Message, field: str, signature: str | None) -> list[_Part]:
    """Text, then one `functionCall` part per tool call; the first call carries
    the thought-signature placeholder (see the module docstring)."""
    parts = _content_parts(message.content, f"{field}.content", images=False)
    for j, call in enumerate(message.tool_calls or []):
        args = tool_arguments(call, f"{field}.tool_calls[{j}].function.arguments", "gemini")
        function_call = _FunctionCall(name=call.function.name, args=args)
        parts.append(
            _Part(function_call=function_call, thought_signature=signature if j == 0 else None)
        )
    return parts


def _tool_output(content: Content | None) -> dict[str, Any]:
    """A tool result as the object `functionResponse.response` must be."""
    if isinstance(content, list):
        content = "".join(part.text for part in content if isinstance(part, TextPart))
    try:
        value = msgspec.json.decode(content or "")
    except msgspec.DecodeError:
        value = content or ""
    return value if isinstance(value, dict) else {"result": value}


def _function_response(message: Message, field: str, names: dict[str, str]) -> _Part:
    """A tool message as a `functionResponse`, named after the call it answers."""
    name = names.get(message.tool_call_id or "") or message.name
    if not name:
        raise _refuse("tool result answers no earlier tool call", f"{field}.tool_call_id")
    response = _FunctionResponse(name=name, response=_tool_output(message.content))
    return _Part(function_response=response)


def _call_names(messages: list[Message]) -> dict[str, str]:
    """Function name by tool call id, from every assistant turn."""
    return {
        call.id: call.function.name for message in messages for call in message.tool_calls or []
    }


def _content(
    message: Message, index: int, names: dict[str, str], signature: str | None
) -> _Content:
    """One non-system message as a Gemini content (possibly with no parts)."""
    field = f"$.request.messages[{index}]"
    if message.role == "assistant":
        return _Content(_model_parts(message, field, signature), "model")
    if message.role == "tool":
        return _Content([_function_response(message, field, names)], "user")
    return _Content(_content_parts(message.content, f"{field}.content", images=True), "user")


def _contents(messages: list[Message], signature: str | None) -> list[_Content]:
    """The conversation without system turns, empty turns dropped and
    consecutive same-role turns merged."""
    names = _call_names(messages)
    contents: list[_Content] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            continue
        content = _content(message, index, names, signature)
        if not content.parts:
            continue
        if contents and contents[-1].role == content.role:
            contents[-1].parts.extend(content.parts)
        else:
            contents.append(content)
    return contents


def _system_instruction(messages: list[Message]) -> _Content | None:
    """Every system and developer message, hoisted in order."""
    parts: list[_Part] = []
    for index, message in enumerate(messages):
        if message.role in ("system", "developer"):
            field = f"$.request.messages[{index}].content"
            parts.extend(_content_parts(message.content, field, images=False))
    return _Content(parts) if parts else None


def _declaration(request: ChatRequest, i: int) -> _FunctionDeclaration:
    """One function; parameters in Gemini's schema dialect, omitted when empty."""
    function = (request.tools or [])[i].function
    parameters = None
    if function.parameters:
        field = f"$.request.tools[{i}].function.parameters"
        parameters = gemini_schema(function.parameters, field)
        if parameters.get("type") == "object" and not parameters.get("properties"):
            parameters = None
    return _FunctionDeclaration(function.name, function.description, parameters)


def _tools(request: ChatRequest) -> list[_Tool] | None:
    """All functions in one `functionDeclarations` tool."""
    if not request.tools:
        return None
    declarations = [_declaration(request, i) for i in range(len(request.tools))]
    return [_Tool(function_declarations=declarations)]


def _tool_config(request: ChatRequest) -> _ToolConfig | None:
    """OpenAI's tool_choice as a function-calling mode."""
    choice = request.tool_choice
    if choice is None or not request.tools:
        if choice not in (None, "none", "auto"):
            raise _refuse("tool_choice requires tools", "$.request.tool_choice")
        return None
    if isinstance(choice, str):
        return _ToolConfig(_FunctionCallingConfig(_MODES[choice]))
    return _ToolConfig(_FunctionCallingConfig("ANY", [choice.function.name]))


def _response_format(request: ChatRequest) -> tuple[str | None, dict[str, Any] | None]:
    """`responseMimeType` and `responseSchema` for OpenAI's response_format."""
    fmt = request.response_format
    if isinstance(fmt, JsonSchemaFormat):
        schema = fmt.json_schema.schema_
        field = "$.request.response_format.json_schema.schema"
        return "application/json", gemini_schema(schema, field) if schema else None
    if isinstance(fmt, JsonObjectFormat):
        return "application/json", None
    return None, None


def _generation_config(request: ChatRequest) -> _GenerationConfig | None:
    """Sampling, limits and output format; None when all are defaults."""
    mime_type, schema = _response_format(request)
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    config = _GenerationConfig(
        temperature=request.temperature,
        top_p=request.top_p,
        max_output_tokens=request.output_limit(),
        stop_sequences=stop or None,
        seed=request.seed,
        response_mime_type=mime_type,
        response_schema=schema,
    )
    return config if config != _GenerationConfig() else None


def generate_content_request(
    request: ChatRequest, deployment: Deployment
) -> _GenerateContentRequest:
    """The generateContent body for a normalized request; raises
    `AdapterError` naming the feature for anything Gemini cannot express."""
    signature = deployment.options.get(
        "thought_signature_placeholder", THOUGHT_SIGNATURE_PLACEHOLDER
    )
    return _GenerateContentRequest(
        contents=_contents(request.messages, signature or None),
        system_instruction=_system_instruction(request.messages),
        tools=_tools(request),
        tool_config=_tool_config(request),
        generation_config=_generation_config(request),
    )


def _url(deployment: Deployment, stream: bool) -> str:
    base = (deployment.api_base or DEFAULT_API_BASE).rstrip("/")
    model = deployment.model.removeprefix("models/")
    method = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{base}/v1beta/models/{model}:{method}"


# --- response translation --------------------------------------------------


def usage_from_gemini(raw: dict[str, Any]) -> Usage:
    """`promptTokenCount` already includes cached tokens; output is the visible
    candidates plus thinking, which Gemini counts apart. Tokens of built-in
    tool prompts (`toolUsePromptTokenCount`) are billed as input, so they are
    added to it."""
    thoughts = int(raw.get("thoughtsTokenCount") or 0)
    prompt = int(raw.get("promptTokenCount") or 0) + int(raw.get("toolUsePromptTokenCount") or 0)
    return Usage(
        input_tokens=prompt,
        output_tokens=int(raw.get("candidatesTokenCount") or 0) + thoughts,
        cache_read_tokens=int(raw.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


def _tool_call(call: _FunctionCall, index: int) -> ToolCall:
    """A Gemini function call with its own id, or a deterministic one."""
    arguments = _encoder.encode(call.args or {}).decode()
    return ToolCall(
        id=call.id or f"call_{index}_{call.name}",
        function=OpenAIFunctionCall(name=call.name, arguments=arguments),
    )


def _finish_reason(reason: str | None, *, has_calls: bool) -> FinishReason:
    """A function call ends the turn as `tool_calls` unless something stopped it."""
    mapped = _FINISH.get(reason or "STOP", "stop")
    return "tool_calls" if has_calls and mapped == "stop" else mapped


def _completion(
    response: _GenerateContentResponse, parts: list[_Part], reason: str | None
) -> Completion:
    """Text parts (thoughts excluded) as content, function calls as tool calls."""
    texts = [p.text for p in parts if p.text and not p.thought]
    calls = [p.function_call for p in parts if p.function_call is not None]
    tool_calls = [_tool_call(call, index) for index, call in enumerate(calls)]
    return Completion(
        id=response.response_id or "",
        model=response.model_version or "",
        content="".join(texts) if texts else None,
        tool_calls=tool_calls or None,
        finish_reason=_finish_reason(reason, has_calls=bool(tool_calls)),
        provider_finish_reason=reason,
    )


def _blocked(feedback: _PromptFeedback | None) -> JobError | None:
    """The prompt itself was refused: no candidate, only a block reason."""
    if feedback is None or feedback.block_reason is None:
        return None
    message = feedback.block_reason_message or f"prompt blocked: {feedback.block_reason}"
    return job_error(
        ErrorKind.CONTENT_POLICY, message, provider_status=200, provider_code=feedback.block_reason
    )


def _reply(
    response: _GenerateContentResponse,
    parts: list[_Part],
    reason: str | None,
    request_id: str | None,
) -> ProviderReply:
    raw_usage = response.usage_metadata or {}
    return ProviderReply(
        completion=_completion(response, parts, reason),
        usage=usage_from_gemini(raw_usage),
        raw_usage=raw_usage,
        request_id=request_id or response.response_id,
    )


def _parts_of(response: _GenerateContentResponse) -> tuple[list[_Part], str | None]:
    """The first candidate's parts and finish reason (one candidate is asked for)."""
    if not response.candidates:
        return [], None
    candidate = response.candidates[0]
    return (candidate.content.parts if candidate.content else []), candidate.finish_reason


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    """The `google.rpc.RetryInfo` delay (`"38s"`) Gemini puts in 429 bodies."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(detail.get("retryDelay", "")))
            if match:
                return float(match[1])
    return None


def _error_kind(status: int | None, body: _ErrorBody) -> ErrorKind:
    """The gRPC status first, refined by wording and reason, else the HTTP status."""
    reasons = {str(detail.get("reason", "")) for detail in body.details}
    if "API_KEY_INVALID" in reasons:
        return ErrorKind.AUTH  # Gemini answers a bad key with 400 INVALID_ARGUMENT
    if body.status == "INVALID_ARGUMENT" and _TOKEN_LIMIT.search(body.message):
        return ErrorKind.CONTEXT_WINDOW_EXCEEDED
    if kind := _KIND_BY_STATUS.get(body.status):
        return kind
    if status is None:
        return ErrorKind.SERVER_ERROR
    return error_for_status(status, body.message, body.status, {}).kind


def _typed_error(status: int | None, body: _ErrorBody, retry_after: float | None) -> JobError:
    return job_error(
        _error_kind(status, body),
        body.message or f"gemini answered HTTP {status}",
        provider_status=status,
        provider_code=body.status or None,
        retry_after_s=retry_after if retry_after is not None else _retry_delay(body.details),
    )


def error_from_gemini(response: HttpResponse) -> JobError:
    """Map a Gemini error response (`{"error": {"code", "message", "status"}}`)."""
    try:
        body = _error_decoder.decode(response.body).error
    except (msgspec.DecodeError, msgspec.ValidationError):
        body = _ErrorBody(message=response.body[:200].decode("utf-8", "replace"))
    return _typed_error(response.status, body, retry_after_s(response.headers))


# --- streaming -------------------------------------------------------------


class GeminiStreamDecoder:
    """Reads one `streamGenerateContent?alt=sse` stream: every event is a whole
    response chunk; function calls arrive whole, usage comes with the last."""

    def __init__(self, request_id: str | None) -> None:
        self._request_id = request_id
        self._last: _GenerateContentResponse | None = None
        self._parts: list[_Part] = []
        self._reason: str | None = None
        self._calls = 0
        self._error: JobError | None = None

    def feed(self, event: str | None, data: str) -> list[StreamDelta]:
        """Deltas for one chunk: its text, its function calls, its finish reason."""
        try:
            chunk = _response_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._error = self._error or malformed(200, f"stream chunk: {exc}")
            return []
        if chunk.error is not None:
            self._error = _typed_error(chunk.error.code, chunk.error, None)
            return []
        self._error = self._error or _blocked(chunk.prompt_feedback)
        usage = chunk.usage_metadata or (self._last.usage_metadata if self._last else None)
        self._last = msgspec.structs.replace(chunk, usage_metadata=usage)
        parts, reason = _parts_of(chunk)
        self._parts.extend(parts)
        self._reason = reason or self._reason
        return self._deltas(parts, reason)

    def finish(self) -> ProviderReply | JobError:
        """The whole reply, or the error the stream ended with."""
        if self._error is not None:
            return self._error
        if self._last is None or self._reason is None:
            return malformed(200, "the stream ended without a finish reason")
        return _reply(self._last, self._parts, self._reason, self._request_id)

    def usage_so_far(self) -> tuple[Usage, dict[str, Any]] | None:
        """The usage of the last chunk that carried any."""
        raw = self._last.usage_metadata if self._last is not None else None
        return (usage_from_gemini(raw), raw) if raw else None

    def _deltas(self, parts: list[_Part], reason: str | None) -> list[StreamDelta]:
        deltas = [delta for part in parts if (delta := self._delta(part)) is not None]
        if reason is not None:
            finish = _finish_reason(reason, has_calls=self._calls > 0)
            deltas.append(StreamDelta(finish_reason=finish))
        return deltas

    def _delta(self, part: _Part) -> StreamDelta | None:
        if part.function_call is not None:
            call = _tool_call(part.function_call, self._calls)
            self._calls += 1
            piece = ToolCallDelta(
                index=self._calls - 1,
                id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
            )
            return StreamDelta(tool_calls=[piece])
        if part.text and not part.thought:
            return StreamDelta(content=part.text)
        return None


# --- the adapter -----------------------------------------------------------


class GeminiOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The `options` a Gemini deployment may set."""

    thought_signature_placeholder: str | None = None


class GeminiAdapter:
    """The Gemini API over HTTPS with an `x-goog-api-key`."""

    name = "gemini"
    request_id_header = None  # Gemini sends its id in the body (`responseId`)

    def check_deployment(self, deployment: Deployment) -> str | None:
        """Every field has a default; `options` must be ones this adapter reads."""
        return options_problem(deployment.options, GeminiOptions)

    def ignored(self, request: ChatRequest, deployment: Deployment) -> list[str]:
        """`parallel_tool_calls`, `user`, message `name`s and image `detail`."""
        return [
            *set_params(request, ("parallel_tool_calls", "user")),
            *unmapped_message_fields(request),
        ]

    def rate_limits(self, headers: Mapping[str, str]) -> RateLimits | None:
        """Gemini sends no rate-limit headers; a 429 may carry `retry-after`."""
        after = retry_after_s(headers)
        return RateLimits(retry_after_s=after) if after is not None else None

    def build_request(
        self, request: ChatRequest, deployment: Deployment, api_key: str | None
    ) -> HttpRequest:
        """The generateContent (or streamGenerateContent) call for a request."""
        headers = {"content-type": "application/json"}
        if api_key:
            headers["x-goog-api-key"] = api_key
        body = _encoder.encode(generate_content_request(request, deployment))
        return HttpRequest(
            method="POST", url=_url(deployment, request.stream), headers=headers, body=body
        )

    def parse_response(self, response: HttpResponse) -> ProviderReply | JobError:
        """A normalized reply from a 200, or the typed error for anything else."""
        if response.status != 200:
            return error_from_gemini(response)
        try:
            data = _response_decoder.decode(response.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return malformed(response.status, str(exc))
        if not data.candidates:
            return _blocked(data.prompt_feedback) or malformed(200, "no candidates in the reply")
        parts, reason = _parts_of(data)
        return _reply(data, parts, reason, None)

    def stream_decoder(self, request_id: str | None) -> GeminiStreamDecoder:
        """A decoder for one streamed 200 response."""
        return GeminiStreamDecoder(request_id)


__all__ = [
    "GeminiAdapter",
    "GeminiStreamDecoder",
    "error_from_gemini",
    "gemini_schema",
    "generate_content_request",
    "usage_from_gemini",
]
