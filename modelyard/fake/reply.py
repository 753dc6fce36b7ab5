"""What the fake model says: deterministic text, tool calls or JSON, with usage.

The answer depends only on the conversation (model, messages, tools, output
format), so the same request always gets the same content, streamed or not,
whatever its token limit (a limit only cuts the same answer shorter).
"""

from __future__ import annotations

import msgspec

from modelyard.fake.cache import PromptCache
from modelyard.fake.conversation import Conversation, Finish, Output, Reply, Tool, ToolCall
from modelyard.fake.schema import sample
from modelyard.fake.text import Entropy, count_tokens, cut_at_stop, digest_of, prose, truncate

_CALL_OVERHEAD_TOKENS = 3  # the template tokens around each call, as real models bill them
_REASONING_BLOCK = 64
_encode = msgspec.json.Encoder().encode


def answer(conversation: Conversation, cache: PromptCache) -> Reply:
    """The reply to conversation; cache is updated with its prompt prefixes."""
    digest = _digest(conversation)
    reasoning = _reasoning_tokens(conversation, digest)
    budget = None if conversation.max_tokens is None else conversation.max_tokens - reasoning
    if budget is not None and budget < 0:
        reasoning, budget = reasoning + budget, 0
    stop = None
    if _calls_tools(conversation):
        content, calls, finish, tokens = _tool_reply(conversation, digest, budget)
    else:
        content, finish, tokens, stop = _text_reply(conversation, digest, budget)
        calls = ()
    read, written = _cache_use(conversation, cache)
    return Reply(
        content=content,
        tool_calls=calls,
        finish=finish,
        prompt_tokens=conversation.prompt_tokens,
        cached_tokens=read,
        completion_tokens=tokens + reasoning,
        reasoning_tokens=reasoning,
        cache_write_tokens=written,
        stop_sequence=stop,
    )


def refusal(conversation: Conversation) -> Reply:
    """A content-policy refusal: the prompt is billed, nothing is generated or cached."""
    return Reply(
        content=None,
        tool_calls=(),
        finish="refused",
        prompt_tokens=conversation.prompt_tokens,
        cached_tokens=0,
        completion_tokens=0,
        reasoning_tokens=0,
    )


def _cache_use(conversation: Conversation, cache: PromptCache) -> tuple[int, int]:
    """Tokens read from and written to the prompt cache, the way the provider caches."""
    if conversation.caching == "explicit":
        return cache.observe_marked(conversation)
    if conversation.caching == "none":
        return 0, 0
    return cache.observe(conversation), 0


def _digest(conversation: Conversation) -> bytes:
    """Digest of everything that shapes the content (not limits, not stop sequences)."""
    parts = [conversation.model, conversation.output.kind, conversation.preamble]
    for turn in conversation.turns:
        parts += (turn.role, turn.text)
    return digest_of(*parts)


def _reasoning_tokens(conversation: Conversation, digest: bytes) -> int:
    """Hidden reasoning of a reasoning model: one to four blocks, chosen by the digest."""
    return _REASONING_BLOCK * (1 + digest[-1] % 4) if conversation.reasons else 0


def _calls_tools(conversation: Conversation) -> bool:
    """Call tools when some are offered, allowed, and the user spoke last."""
    return (
        bool(conversation.tools)
        and conversation.tool_choice.mode != "none"
        and bool(conversation.turns)
        and conversation.turns[-1].role == "user"
    )


def _text_reply(
    conversation: Conversation, digest: bytes, budget: int | None
) -> tuple[str, Finish, int, str | None]:
    """Content cut at the first stop sequence, then at the budget; and the stop that cut it."""
    text, stop = cut_at_stop(_render(conversation.output, digest), conversation.stop)
    text, cut = truncate(text, budget)
    if cut:
        return text, "length", count_tokens(text), None
    return text, "end" if stop is None else "stop_sequence", count_tokens(text), stop


def _render(output: Output, digest: bytes) -> str:
    """The full answer in the requested output format."""
    if output.kind == "json_schema" and output.schema is not None:
        return _encode(sample(output.schema, Entropy(digest))).decode()
    if output.kind != "text":
        return _encode({"answer": prose(digest)}).decode()
    return prose(digest)


def _tool_reply(
    conversation: Conversation, digest: bytes, budget: int | None
) -> tuple[str | None, tuple[ToolCall, ...], Finish, int]:
    """Calls to the chosen tools, cut short when they do not fit the budget."""
    entropy = Entropy(digest)
    calls = [_call(tool, entropy) for tool in _chosen_tools(conversation)]
    kept: list[ToolCall] = []
    spent = 0
    for call in calls:
        cost = _CALL_OVERHEAD_TOKENS + count_tokens(call.name)
        room = None if budget is None else budget - spent - cost
        if room is not None and room <= 0:
            return ("" if not kept else None), tuple(kept), "length", spent
        arguments, cut = truncate(call.arguments_json, room)
        kept.append(ToolCall(call.key, call.name, call.arguments, arguments))
        spent += cost + count_tokens(arguments)
        if cut:
            return None, tuple(kept), "length", spent
    return None, tuple(kept), "tool_calls", spent


def _chosen_tools(conversation: Conversation) -> list[Tool]:
    """The named tool, else the first two when parallel calls are allowed, else the first."""
    tools = conversation.tools
    if conversation.tool_choice.mode == "named":
        return [t for t in tools if t.name == conversation.tool_choice.name][:1]
    return list(tools[: 2 if conversation.parallel_tool_calls else 1])


def _call(tool: Tool, entropy: Entropy) -> ToolCall:
    """A call to tool with arguments built from its parameter schema."""
    arguments = sample(tool.parameters, entropy)
    if not isinstance(arguments, dict):
        arguments = {}
    return ToolCall(entropy.hex(24), tool.name, arguments, _encode(arguments).decode())
