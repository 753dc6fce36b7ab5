"""A fake LLM provider that speaks real wire formats, for tests, the demo and benchmarks.

Answers are deterministic (derived from the prompt), usage is computed from
the text, and faults (429s, 5xx, hangs, malformed bodies) are injected at
seeded rates. Five wire formats are served side by side: OpenAI Chat
Completions, Anthropic Messages, Gemini generateContent, Mistral chat
completions (under ``/mistral``) and Azure OpenAI. Each lives in its own
subpackage as a ``dialect`` of the shared request ``handler`` and translates
to and from the neutral core (``conversation``, ``reply``, ``text``,
``schema``, ``cache``, ``screen``).
"""

from modelyard.fake.requestlog import LogEntry
from modelyard.fake.server import create_app, serve, start
from modelyard.fake.settings import FakeSettings, Fault

__all__ = ["FakeSettings", "Fault", "LogEntry", "create_app", "serve", "start"]
