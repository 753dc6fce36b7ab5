"""Provider adapters, by the name a deployment's `provider` field uses.

Provider differences live here and nowhere else."""

from workers.providers.base import Adapter, AdapterError, HttpRequest, HttpResponse, ProviderReply
from workers.providers.openai import OpenAIAdapter

PROVIDERS: dict[str, Adapter] = {
    "openai": OpenAIAdapter(),
}

__all__ = ["PROVIDERS", "Adapter", "AdapterError", "HttpRequest", "HttpResponse", "ProviderReply"]
