"""The OpenAI Chat Completions wire format of the fake provider.

``parse`` turns a request body into a ``Conversation`` (or OpenAI's 400),
``render`` turns a ``Reply`` into OpenAI's bodies and chunks, ``errors`` and
``headers`` hold OpenAI's exact error bodies and response headers, and
``routes`` is OpenAI's dialect for ``POST /v1/chat/completions``. Azure
reuses ``parse``, ``render`` and ``errors``.
"""

from modelyard.fake.openai.routes import add_routes

__all__ = ["add_routes"]
