"""The Mistral chat completions wire format of the fake provider.

Served under ``/mistral/v1`` because ``/v1/chat/completions`` is OpenAI's:
a deployment's api_base is ``http://host:port/mistral/v1``. ``parse`` turns
a request into a ``Conversation`` (422 for what Mistral's schema rejects,
400 for what its chat template rejects), ``render`` turns a ``Reply`` into
Mistral's bodies and chunks, ``errors`` holds its error bodies, and
``routes`` ties them to ``POST /mistral/v1/chat/completions``.
"""

from modelyard.fake.mistral.routes import add_routes

__all__ = ["add_routes"]
