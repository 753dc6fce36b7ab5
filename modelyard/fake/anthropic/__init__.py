"""The Anthropic Messages wire format of the fake provider.

``parse`` turns a request body into a ``Conversation`` (with the cache
breakpoints its ``cache_control`` marks set), ``render`` turns a ``Reply``
into a Message and its stream of events, ``errors`` and ``headers`` hold
Anthropic's error bodies and response headers, and ``routes`` ties them to
``POST /v1/messages``.
"""

from modelyard.fake.anthropic.routes import add_routes

__all__ = ["add_routes"]
