"""Deterministic reply text and the toy tokenizer every usage figure comes from.

A token is a run of word characters or a single other non-space character,
the way a real BPE tokenizer roughly splits English. Whitespace belongs to the
token that follows it, so a list of token pieces joins back to the exact text
(which is what streaming needs).
"""

from __future__ import annotations

import functools
import hashlib
import re

_TOKEN = re.compile(r"\w+|[^\w\s]")
_DIGEST_SIZE = 64

_VOCAB_TEXT = """
able about account across action active actual adapter agent answer apply
area async balance batch before better beyond border branch bridge bright
broker budget buffer build cache careful center channel choice clear cloud
common compact consumer context copper cost credit current daily data
decimal default delta detail direct domain durable early effort engine entry
even event exact fabric factor fair fast field final first fixed flow focus
forward fresh future gateway gentle golden graph green guide harbor heavy
honest idle inner input journal kernel ledger level light limit linear local
logic lucid margin market measure merge metric middle model modest narrow
native neat network next noble normal number ocean open orbit order output
owner packet parcel patient plain pocket policy prompt proper queue quiet
rapid ready record region reply result retry river robust route runner safe
sample scale schema second signal simple single small solid source spare
stable steady stream strong subtle summary system table target tensor theory
timely token topic trace tunnel upper useful valid value vector vivid warm
window worker yield
"""
VOCAB = tuple(_VOCAB_TEXT.split())

_MIN_WORDS = 12
_MAX_WORDS = 48
_WORDS_AT = 16  # digest bytes before this pick sentence lengths, the rest pick words


@functools.lru_cache(maxsize=8192)
def count_tokens(text: str) -> int:
    """Number of tokens in text; cached because system prompts repeat across requests."""
    return len(_TOKEN.findall(text))


def split_tokens(text: str) -> list[str]:
    """Token pieces of text, each with the whitespace before it; they join back to text."""
    pieces: list[str] = []
    start = 0
    for match in _TOKEN.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    if start < len(text) and pieces:
        pieces[-1] += text[start:]
    return pieces


def truncate(text: str, limit: int | None) -> tuple[str, bool]:
    """The first limit tokens of text, and whether anything was cut off."""
    if limit is None or count_tokens(text) <= limit:
        return text, False
    return "".join(split_tokens(text)[: max(limit, 0)]), True


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, str | None]:
    """Text up to (excluding) the earliest stop sequence, and the stop sequence found there."""
    found = [(at, stop) for stop in stops if stop and (at := text.find(stop)) >= 0]
    if not found:
        return text, None
    at, stop = min(found)
    return text[:at], stop


def digest_of(*parts: str) -> bytes:
    """A stable 64-byte digest of the parts (not Python's per-process hash)."""
    return hashlib.blake2b("\x00".join(parts).encode(), digest_size=_DIGEST_SIZE).digest()


@functools.lru_cache(maxsize=4096)
def prose(digest: bytes) -> str:
    """A few plain sentences chosen by the digest: same digest, same text."""
    count = _MIN_WORDS + digest[0] % (_MAX_WORDS - _MIN_WORDS + 1)
    words = [VOCAB[byte % len(VOCAB)] for byte in digest[_WORDS_AT : _WORDS_AT + count]]
    sentences: list[str] = []
    start = 0
    for length_byte in digest[1:_WORDS_AT]:
        if start >= count:
            break
        end = start + 4 + length_byte % 8
        sentences.append(_sentence(words[start:end]))
        start = end
    return " ".join(sentences)


def _sentence(words: list[str]) -> str:
    """Words as a capitalised sentence ending with a full stop."""
    text = " ".join(words)
    return text[:1].upper() + text[1:] + "."


class Entropy:
    """An endless deterministic byte source that starts from a digest.

    Used where a reply needs more choices than one digest holds (tool
    arguments, JSON-schema values); when the bytes run out it rehashes.
    """

    def __init__(self, digest: bytes) -> None:
        self._digest = digest
        self._next = 0

    def byte(self) -> int:
        """The next byte, 0..255."""
        if self._next == len(self._digest):
            self._digest = hashlib.blake2b(self._digest, digest_size=_DIGEST_SIZE).digest()
            self._next = 0
        self._next += 1
        return self._digest[self._next - 1]

    def word(self) -> str:
        """The next vocabulary word."""
        return VOCAB[self.byte() % len(VOCAB)]

    def hex(self, length: int) -> str:
        """length hex characters, for ids that should stay the same for the same request."""
        return bytes(self.byte() for _ in range((length + 1) // 2)).hex()[:length]
