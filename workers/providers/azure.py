"""Azure OpenAI: OpenAI's wire format behind per-deployment URLs.

Differences from OpenAI, all here: the URL names the Azure deployment
(`options.azure_deployment`, default the deployment's `model`) and carries
`api-version` (`options.api_version`); the key goes in an `api-key` header.
Bodies, responses, streams and errors are OpenAI's; Azure's content filter
answers 400 `content_filter`, which the OpenAI error mapping already reads as
`content_policy`.
"""

from __future__ import annotations

from urllib.parse import quote

from modelyard.config import Deployment
from workers.providers.openai import OpenAIAdapter, OpenAIOptions

DEFAULT_API_VERSION = "2024-10-21"


class AzureOptions(OpenAIOptions, kw_only=True, forbid_unknown_fields=True):
    """Azure's own options, besides the OpenAI family's quirks."""

    azure_deployment: str | None = None
    api_version: str = DEFAULT_API_VERSION


class AzureOpenAIAdapter(OpenAIAdapter):
    """Chat completions on an Azure OpenAI resource."""

    name = "azure"
    request_id_header = "apim-request-id"

    options_type = AzureOptions

    def check_deployment(self, deployment: Deployment) -> str | None:
        """Azure has no default endpoint: the resource URL is required."""
        if not deployment.api_base:
            return "api_base: azure needs the resource URL (https://NAME.openai.azure.com)"
        return super().check_deployment(deployment)

    def url(self, deployment: Deployment) -> str:
        """`{resource}/openai/deployments/{name}/chat/completions?api-version=...`."""
        assert deployment.api_base is not None  # check_deployment ran at config load
        name = quote(str(deployment.options.get("azure_deployment", deployment.model)), safe="")
        version = deployment.options.get("api_version", DEFAULT_API_VERSION)
        base = deployment.api_base.rstrip("/")
        return f"{base}/openai/deployments/{name}/chat/completions?api-version={version}"

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """Azure's key header."""
        return {"api-key": api_key} if api_key else {}
