"""Provider adapters, by the name a deployment's `provider` field uses.

Provider differences live here and nowhere else. OpenAI-compatible servers
(vLLM, Ollama, Groq, Together, DeepSeek, ...) use `openai` with an `api_base`
and, where they differ, `options` quirks (see `openai.Quirks`)."""

from workers.providers.anthropic import AnthropicAdapter
from workers.providers.azure import AzureOpenAIAdapter
from workers.providers.base import Adapter, AdapterError, HttpRequest, HttpResponse, ProviderReply
from workers.providers.gemini import GeminiAdapter
from workers.providers.mistral import MistralAdapter
from workers.providers.openai import OpenAIAdapter

PROVIDERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        OpenAIAdapter(),
        AzureOpenAIAdapter(),
        AnthropicAdapter(),
        GeminiAdapter(),
        MistralAdapter(),
    )
}

__all__ = ["PROVIDERS", "Adapter", "AdapterError", "HttpRequest", "HttpResponse", "ProviderReply"]
