"""What a call cost: prices resolved once per deployment, exact Decimal arithmetic.

Prices come from the genai-prices package (a maintained, dated price database)
unless the deployment's config overrides them. The lookup is done once per
deployment at worker start; per call we only multiply, because genai-prices'
own `calc_price` costs ~200 µs, too much on the hot path. A model nobody
priced is reported `unknown`, never billed at zero.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import msgspec
from genai_prices import data_snapshot
from genai_prices.types import ModelPrice, TieredPrices

from modelyard.config import Deployment
from schemas.chat import ChatRequest, ImagePart
from schemas.costs import PriceSource
from schemas.results import Usage

MILLION = Decimal(1_000_000)


class Rate(msgspec.Struct, frozen=True):
    """USD per million tokens; past `tiers[i][0]` input tokens the whole call
    is priced at `tiers[i][1]` (the providers' "cliff" tiers)."""

    base: Decimal
    tiers: tuple[tuple[int, Decimal], ...] = ()

    def at(self, input_tokens: int) -> Decimal:
        """The per-million price that applies to a call of this prompt size."""
        price = self.base
        for start, tier_price in self.tiers:
            if input_tokens > start:
                price = tier_price
        return price


class PriceCard(msgspec.Struct, frozen=True):
    """Prices for one deployment, and where they came from."""

    source: PriceSource
    input: Rate | None = None
    output: Rate | None = None
    cache_read: Rate | None = None
    cache_write: Rate | None = None


UNKNOWN = PriceCard(source="unknown")


def cost_of(usage: Usage, card: PriceCard) -> Decimal | None:
    """The exact USD cost of `usage`, or None when the price is unknown.

    Cached and cache-written tokens are inside `input_tokens` (see `Usage`), so
    they are taken out of the plain input count and billed at their own rates.
    """
    if card.input is None or card.output is None:
        return None
    size = usage.input_tokens
    cache_read = card.cache_read or card.input
    cache_write = card.cache_write or card.input
    plain_input = max(usage.input_tokens - usage.cache_read_tokens - usage.cache_write_tokens, 0)
    micro_total = (
        plain_input * card.input.at(size)
        + usage.cache_read_tokens * cache_read.at(size)
        + usage.cache_write_tokens * cache_write.at(size)
        + usage.output_tokens * card.output.at(size)
    )
    return micro_total / MILLION


def _rate(value: Decimal | TieredPrices | None) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, TieredPrices):
        return Rate(base=value.base, tiers=tuple((t.start, t.price) for t in value.tiers))
    return Rate(base=value)


def _from_genai_prices(price: ModelPrice) -> PriceCard:
    def get(key: str) -> Decimal | TieredPrices | None:
        return price.__dict__.get(key)

    return PriceCard(
        source="genai-prices",
        input=_rate(get("input_mtok")),
        output=_rate(get("output_mtok")),
        cache_read=_rate(get("cache_read_mtok")),
        cache_write=_rate(get("cache_write_mtok")),
    )


def price_card(deployment: Deployment, at: datetime | None = None) -> PriceCard:
    """Resolve a deployment's prices: its override, else genai-prices, else unknown."""
    if (override := deployment.price) is not None:
        return PriceCard(
            source="override",
            input=Rate(base=override.input_per_mtok),
            output=Rate(base=override.output_per_mtok),
            cache_read=_rate(override.cache_read_per_mtok),
            cache_write=_rate(override.cache_write_per_mtok),
        )
    provider_id = deployment.price_provider or deployment.provider
    try:
        _, model = data_snapshot.get_snapshot().find_provider_model(
            deployment.model, None, provider_id, None
        )
    except LookupError:
        return UNKNOWN
    card = _from_genai_prices(model.get_prices(at or datetime.now(UTC)))
    return card if card.input is not None and card.output is not None else UNKNOWN


# An answer's length when the job sets no `max_tokens`, for estimates only.
DEFAULT_OUTPUT_ESTIMATE = 1024
# Characters per token, roughly, across the providers' tokenizers; the
# request's JSON (images included) over-counts, which an estimate can afford.
CHARS_PER_TOKEN = 4


def estimated_tokens(request: ChatRequest) -> tuple[int, int]:
    """A job's input and output tokens, estimated before it runs: the input
    from the size of its messages, the output from its `max_tokens`."""
    text = msgspec.json.encode(request.messages)
    output = request.output_limit() or DEFAULT_OUTPUT_ESTIMATE
    return len(text) // CHARS_PER_TOKEN + 1, output


def estimated_cost(card: PriceCard, input_tokens: int, output_tokens: int) -> Decimal | None:
    """What a call of this size would cost at `card`'s prices, or None when unknown."""
    if card.input is None or card.output is None:
        return None
    micro = input_tokens * card.input.at(input_tokens) + output_tokens * card.output.at(
        input_tokens
    )
    return micro / MILLION


def token_bound(request: ChatRequest, *, image_tokens: int, max_output: int) -> tuple[int, int]:
    """Tokens a call can be billed for, at most: every token of text is at
    least one byte, so the request's JSON size bounds its input (images
    count `image_tokens` each instead of their bytes); the output is its
    `max_tokens`, or `max_output` (which the caller then enforces)."""
    images = [
        part.image_url.url
        for message in request.messages
        if isinstance(message.content, list)
        for part in message.content
        if isinstance(part, ImagePart)
    ]
    size = len(msgspec.json.encode(request)) - sum(len(url) for url in images)
    return size + image_tokens * len(images), request.output_limit() or max_output
