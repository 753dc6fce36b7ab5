"""The Google Gemini (Generative Language API) wire format of the fake provider.

``parse`` turns a GenerateContentRequest into a ``Conversation`` (the model
comes from the URL), ``render`` turns a ``Reply`` into GenerateContentResponse
bodies and stream chunks, ``errors`` holds Google's error bodies, and
``routes`` ties them to ``POST /v1beta/models/{model}:generateContent`` and
``:streamGenerateContent``.
"""

from modelyard.fake.gemini.routes import add_routes

__all__ = ["add_routes"]
