"""The Azure OpenAI wire format of the fake provider.

Azure speaks OpenAI's Chat Completions (the request is parsed by
``modelyard.fake.openai.parse``) with its own URL, key header, error bodies
and content-filter annotations. ``routes`` ties it to
``POST /openai/deployments/{deployment}/chat/completions?api-version=...``.
"""

from modelyard.fake.azure.routes import add_routes

__all__ = ["add_routes"]
