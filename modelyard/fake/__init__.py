"""A fake LLM provider that speaks real wire formats, for tests, the demo and benchmarks.

Answers are deterministic (derived from the prompt), usage is computed from
the text, and faults (429s, 5xx, hangs, malformed bodies) are injected at
seeded rates. Only OpenAI's Chat Completions format exists so far; each wire
format lives in its own subpackage and shares the neutral core
(``conversation``, ``reply``, ``text``, ``schema``, ``cache``).
"""

from modelyard.fake.requestlog import LogEntry
from modelyard.fake.server import create_app, serve, start
from modelyard.fake.settings import FakeSettings, Fault

__all__ = ["FakeSettings", "Fault", "LogEntry", "create_app", "serve", "start"]
