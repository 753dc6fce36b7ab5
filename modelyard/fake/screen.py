"""Requests a provider refuses before answering: too long for the context window, or against policy.

Both are deterministic so gateway tests can trigger them on purpose: a prompt
of more than ``FakeSettings.context_window`` tokens, or one that contains
``POLICY_TRIGGER`` anywhere in its messages. Each wire format answers them
with its provider's own error (or, where the provider refuses with a 200,
with a refusal).
"""

from __future__ import annotations

from dataclasses import dataclass

from modelyard.fake.conversation import Conversation

POLICY_TRIGGER = "forbidden-content"


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """The prompt contains the policy trigger."""


@dataclass(frozen=True, slots=True)
class ContextWindow:
    """The prompt has tokens tokens, more than the limit."""

    tokens: int
    limit: int


Rejection = ContentPolicy | ContextWindow


def screen(conversation: Conversation, context_window: int) -> Rejection | None:
    """Why the provider would refuse conversation, or None; the length is checked first."""
    tokens = conversation.prompt_tokens
    if tokens > context_window:
        return ContextWindow(tokens, context_window)
    if any(POLICY_TRIGGER in turn.text for turn in conversation.turns):
        return ContentPolicy()
    return None
