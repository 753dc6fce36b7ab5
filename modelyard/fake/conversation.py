"""The provider-neutral request and reply every wire format translates to and from.

A wire module (``openai``, ``anthropic``, ``gemini``...) parses its request
into a ``Conversation``, asks ``reply.answer`` for a ``Reply`` and renders that
in its own format. Token counts that depend on a provider's chat template
(per-message overhead) are filled in by the wire module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ToolMode = Literal["none", "auto", "required", "named"]
OutputKind = Literal["text", "json_object", "json_schema"]
Finish = Literal["end", "stop_sequence", "length", "tool_calls", "refused"]
"""Why generation ended; wire modules map these to their own names.

``refused`` is a content-policy refusal answered with a 200 (Anthropic's
``refusal`` stop reason, Gemini's blocked prompt): the prompt is billed,
nothing is generated.
"""
Caching = Literal["automatic", "explicit", "none"]
"""How a provider caches prompts: every long prefix (OpenAI, Gemini), only up to
marked blocks (Anthropic's ``cache_control``), or not at all as far as usage
shows (Mistral)."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One message: its role, its text (tool calls included) and its token count."""

    role: Role
    text: str
    tokens: int


@dataclass(frozen=True, slots=True)
class Tool:
    """A function the model may call, with its JSON-schema parameters."""

    name: str
    parameters: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ToolChoice:
    """Whether tools may, must or must not be called; ``name`` is set when mode is named."""

    mode: ToolMode = "auto"
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Output:
    """The requested shape of the text answer; schema is set for json_schema."""

    kind: OutputKind = "text"
    schema: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class CachePoint:
    """A block marked for caching: the hash of the prompt up to and including it, and its size."""

    key: int
    tokens: int


@dataclass(frozen=True, slots=True)
class Conversation:
    """Everything the fake needs to answer, independent of the wire format.

    ``preamble`` is the text that comes before the messages in the prompt
    (tool and schema definitions); it is part of every cached prefix.
    ``priming_tokens`` are the template tokens after the last message.
    ``cache_points`` are only read when ``caching`` is explicit.
    """

    model: str
    turns: tuple[Turn, ...]
    preamble: str = ""
    preamble_tokens: int = 0
    priming_tokens: int = 0
    tools: tuple[Tool, ...] = ()
    tool_choice: ToolChoice = field(default_factory=ToolChoice)
    parallel_tool_calls: bool = True
    output: Output = field(default_factory=Output)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    reasons: bool = False
    caching: Caching = "automatic"
    cache_points: tuple[CachePoint, ...] = ()

    @property
    def prompt_tokens(self) -> int:
        """Prompt size as the provider bills it."""
        return self.preamble_tokens + sum(t.tokens for t in self.turns) + self.priming_tokens


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A call the fake decided to make.

    ``arguments_json`` is what goes on the wire; it is cut short (and then no
    longer valid JSON) when the token budget ran out, while ``arguments``
    always holds the whole object.
    """

    key: str
    name: str
    arguments: dict[str, Any]
    arguments_json: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The answer and its usage.

    Counters are inclusive, as OpenAI reports them: prompt_tokens include
    cached_tokens (read from the cache) and cache_write_tokens (written to it),
    completion_tokens include reasoning_tokens. ``stop_sequence`` is the stop
    sequence that ended the answer, when one did.
    """

    content: str | None
    tool_calls: tuple[ToolCall, ...]
    finish: Finish
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cache_write_tokens: int = 0
    stop_sequence: str | None = None
