"""Cost arithmetic: exact decimals, cross-checked with genai-prices itself."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest
from genai_prices import Usage as GenaiUsage
from genai_prices import data_snapshot

from modelyard.config import Deployment, PriceOverride
from modelyard.prices import UNKNOWN, PriceCard, Rate, cost_of, price_card
from schemas.results import Usage


def deployment(provider: str, model: str, price: PriceOverride | None = None) -> Deployment:
    return Deployment(provider=provider, model=model, pool="p", name="d", price=price)


@pytest.mark.parametrize(
    ("provider", "model", "usage"),
    [
        (
            "openai",
            "gpt-4o-mini",
            Usage(input_tokens=1000, cache_read_tokens=200, output_tokens=100),
        ),
        ("openai", "gpt-4o", Usage(input_tokens=5000, output_tokens=2500)),
        (
            "anthropic",
            "claude-sonnet-4-5",
            Usage(
                input_tokens=1300, cache_read_tokens=1000, cache_write_tokens=200, output_tokens=50
            ),
        ),
        ("anthropic", "claude-sonnet-4-5", Usage(input_tokens=250_000, output_tokens=1000)),  # tier
        (
            "google",
            "gemini-2.5-flash",
            Usage(input_tokens=4000, cache_read_tokens=2048, output_tokens=700),
        ),
    ],
)
def test_cost_matches_genai_prices(provider: str, model: str, usage: Usage) -> None:
    _, info = data_snapshot.get_snapshot().find_provider_model(model, None, provider, None)
    genai = GenaiUsage(
        input_tokens=usage.input_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
        output_tokens=usage.output_tokens,
    )
    expected = info.get_prices(datetime.now(UTC)).calc_price(genai)["total_price"]

    assert cost_of(usage, price_card(deployment(provider, model))) == expected


def test_override_prices_cache_reads_at_their_own_rate() -> None:
    card = price_card(
        deployment(
            "openai",
            "house",
            PriceOverride(
                input_per_mtok=Decimal("2"),
                output_per_mtok=Decimal("8"),
                cache_read_per_mtok=Decimal("0.5"),
            ),
        )
    )
    usage = Usage(input_tokens=1_000_000, cache_read_tokens=400_000, output_tokens=10)

    # 600k plain input at $2, 400k cached at $0.50, 10 output at $8 per million
    assert cost_of(usage, card) == Decimal("1.2") + Decimal("0.2") + Decimal("0.00008")
    assert card.source == "override"


def test_unknown_model_has_no_price_never_zero() -> None:
    card = price_card(deployment("openai", "definitely-not-a-model-7"))

    assert card == UNKNOWN
    assert cost_of(Usage(input_tokens=10, output_tokens=10), card) is None


def test_cliff_tier_prices_the_whole_call() -> None:
    card = PriceCard(
        source="override",
        input=Rate(base=Decimal(3), tiers=((200_000, Decimal(6)),)),
        output=Rate(base=Decimal(15), tiers=((200_000, Decimal("22.5")),)),
    )

    assert cost_of(Usage(input_tokens=200_000, output_tokens=0), card) == Decimal("0.6")
    assert cost_of(Usage(input_tokens=200_001, output_tokens=0), card) == Decimal("1.200006")


def test_money_stays_decimal() -> None:
    card = price_card(deployment("openai", "gpt-4o-mini"))

    assert isinstance(cost_of(Usage(input_tokens=3, output_tokens=7), card), Decimal)
