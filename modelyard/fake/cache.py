"""Prompt caching: long repeated prefixes are billed as cached.

Automatic caching (OpenAI, Gemini): the fake remembers hashes of
message-aligned prompt prefixes (model, preamble and the first k messages). A
request whose prefix, without its last message, was seen before gets that
prefix's tokens, rounded down to the cache block size, as cached tokens. Real
caching is token-aligned; message alignment is close enough for gateway
accounting tests and cheap to compute.

Explicit caching (Anthropic's ``cache_control``): only prefixes ending at a
marked block are cached. The longest marked prefix seen before is read; the
prompt up to the last marked block, past what was read, is written.
"""

from __future__ import annotations

from modelyard.fake.conversation import Conversation

_CAPACITY = 65_536
_MIN_TOKENS = 1024
_BLOCK = 128


class PromptCache:
    """A bounded LRU set of prefix hashes; only prefixes of min_tokens or more are kept."""

    def __init__(
        self, capacity: int = _CAPACITY, min_tokens: int = _MIN_TOKENS, block: int = _BLOCK
    ) -> None:
        self._seen: dict[int, None] = {}
        self._capacity = capacity
        self._min_tokens = min_tokens
        self._block = block

    def observe(self, conversation: Conversation) -> int:
        """Cached tokens for this request, then remember its prefixes for the next ones."""
        if conversation.prompt_tokens < self._min_tokens:
            return 0
        prefixes = _prefixes(conversation)
        hit = self._longest_hit(prefixes[:-1])
        for key, tokens in prefixes:
            if tokens >= self._min_tokens:
                self._remember(key)
        return hit // self._block * self._block

    def observe_marked(self, conversation: Conversation) -> tuple[int, int]:
        """(read, written) tokens for a prompt with marked blocks, then remember its marks.

        Marks whose prefix is shorter than min_tokens are ignored, as the
        real API silently ignores them.
        """
        points = [p for p in conversation.cache_points if p.tokens >= self._min_tokens]
        if not points:
            return 0, 0
        read = next((p.tokens for p in reversed(points) if p.key in self._seen), 0)
        for point in points:
            self._remember(point.key)
        return read, points[-1].tokens - read

    def clear(self) -> None:
        """Forget every prefix."""
        self._seen.clear()

    def _longest_hit(self, prefixes: list[tuple[int, int]]) -> int:
        """Token count of the longest remembered prefix, 0 when none is long enough."""
        for key, tokens in reversed(prefixes):
            if tokens < self._min_tokens:
                return 0
            if key in self._seen:
                return tokens
        return 0

    def _remember(self, key: int) -> None:
        """Mark key most recently used, evicting the least recently used past capacity."""
        self._seen.pop(key, None)
        self._seen[key] = None
        if len(self._seen) > self._capacity:
            del self._seen[next(iter(self._seen))]


def _prefixes(conversation: Conversation) -> list[tuple[int, int]]:
    """(hash, tokens) of every message-aligned prefix, shortest first.

    Python's hash is randomised per process, which is fine: the cache lives
    in memory only.
    """
    key = hash((conversation.model, conversation.preamble))
    tokens = conversation.preamble_tokens
    prefixes: list[tuple[int, int]] = []
    for turn in conversation.turns:
        key = hash((key, turn.role, turn.text))
        tokens += turn.tokens
        prefixes.append((key, tokens))
    return prefixes
