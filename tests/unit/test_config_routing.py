"""Config validation (errors name their path) and the routing choice."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from modelyard.client import new_job
from modelyard.config import ConfigError, load, parse
from router.routing import build_route_table
from schemas.chat import Message
from workers.providers import PROVIDERS


def doc(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "deployments": {
            "a": {"provider": "openai", "model": "gpt-4o-mini", "pool": "p"},
            "b": {"provider": "anthropic", "model": "claude-sonnet-4-5", "pool": "q"},
        },
        "models": {
            "chat": {
                "aliases": ["default"],
                "deployments": [{"deployment": "a", "weight": 3}, {"deployment": "b", "weight": 1}],
            }
        },
    }
    base.update(overrides)
    return base


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"deployments": {"a": {"provider": "nope", "model": "m", "pool": "p"}}},
            "deployments.a.provider",
        ),
        (
            {"deployments": {"a": {"provider": "openai", "model": "m", "pool": "p p"}}},
            "deployments.a.pool",
        ),
        (
            {"deployments": {"a": {"provider": "openai", "model": "m", "pool": "p", "x": 1}}},
            "deployments.a: ",
        ),
        (
            {"deployments": {"a": {"provider": "azure", "model": "m", "pool": "p"}}},
            "deployments.a.api_base",
        ),
        (
            {
                "deployments": {
                    "a": {"provider": "openai", "model": "m", "pool": "p", "timeout_s": "soon"}
                }
            },
            "deployments.a.timeout_s",
        ),
        (
            {"models": {"chat": {"deployments": [{"deployment": "zzz"}]}}},
            "models.chat.deployments[0].deployment",
        ),
        ({"models": {"chat": {"deployments": []}}}, "models.chat.deployments"),
        (
            {
                "models": {
                    "chat": {"deployments": [{"deployment": "a"}]},
                    "other": {"aliases": ["chat"], "deployments": [{"deployment": "a"}]},
                }
            },
            "models.other",
        ),
        (
            {
                "deployments": {
                    "a": {
                        "provider": "openai",
                        "model": "m",
                        "pool": "p",
                        "price": {"input_per_mtok": -1, "output_per_mtok": 1},
                    }
                }
            },
            "deployments.a.price.input_per_mtok",
        ),
        ({"router": {"concurrency": 0}}, "router.concurrency"),
        ({"router": {"concurrency": 70000}}, "router.concurrency"),
        ({"log_level": "verbose"}, "log_level"),
        (
            {
                "deployments": {
                    "a": {
                        "provider": "openai",
                        "model": "m",
                        "pool": "p",
                        "api_base": "localhost:8000",
                    }
                }
            },
            "deployments.a.api_base",
        ),
        (
            {
                "deployments": {
                    "a": {
                        "provider": "openai",
                        "model": "m",
                        "pool": "p",
                        "options": {"drop_parms": []},
                    }
                }
            },
            "deployments.a.options: Object contains unknown field `drop_parms`",
        ),
        (
            {
                "deployments": {
                    "a": {
                        "provider": "openai",
                        "model": "m",
                        "pool": "p",
                        "options": {"extra_headers": ["x"]},
                    }
                }
            },
            "deployments.a.options.extra_headers",
        ),
        (
            {
                "deployments": {
                    "a": {
                        "provider": "anthropic",
                        "model": "m",
                        "pool": "p",
                        "options": {"default_max_tokens": 0},
                    }
                }
            },
            "deployments.a.options.default_max_tokens",
        ),
        (
            {"access": {"reservation_ttl_s": 300}},
            "access.reservation_ttl_s: must be longer than the longest timeout_s or "
            "stream_timeout_s (600s)",
        ),
        (
            {"broker_consumer_timeout_s": 600},
            "broker_consumer_timeout_s: the broker's consumer timeout (600s) must be longer "
            "than the longest timeout_s or stream_timeout_s (600s)",
        ),
    ],
)
def test_bad_config_names_its_path(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse(doc(**change), {}, PROVIDERS)

    assert message in str(error.value)


def test_env_overrides_urls_and_yaml_decimals_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "deployments:\n"
        "  a: {provider: openai, model: m, pool: p,\n"
        "      price: {input_per_mtok: 0.15, output_per_mtok: 0.6}}\n"
        "models:\n  chat: {deployments: [{deployment: a}]}\n"
    )
    config = load(
        path,
        {
            "MODELYARD_BROKER_URL": "amqp://elsewhere/",
            "MODELYARD_DATABASE_URL": "postgresql://db/x",
        },
    )

    assert (config.broker_url, config.database_url) == ("amqp://elsewhere/", "postgresql://db/x")
    price = config.deployments["a"].price
    assert price is not None
    assert str(price.input_per_mtok) == "0.15"


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "absent.yaml")


def test_alias_and_weighted_choice() -> None:
    table = build_route_table(parse(doc(), {}, PROVIDERS))
    group = table.resolve("default")
    assert group is not None
    rng = random.Random(42)
    job = new_job("default", [Message(role="user", content="hi")])

    picks = Counter(
        pick.deployment.name for _ in range(4000) if (pick := table.choose(group, job, rng))
    )

    assert table.resolve("chat") is group
    assert table.resolve("missing") is None
    assert set(picks) == {"a", "b"}
    assert 0.70 < picks["a"] / 4000 < 0.80  # weight 3 of 4


def test_worker_refuses_to_start_without_its_key() -> None:
    from modelyard.config import ConfigError as Error  # noqa: PLC0415
    from workers.pool import Worker  # noqa: PLC0415

    config = parse(
        doc(
            deployments={
                "a": {"provider": "openai", "model": "m", "pool": "p", "api_key_env": "K"}
            },
            models={},
        ),
        {},
        PROVIDERS,
    )

    with pytest.raises(Error, match=r"deployments\.a\.api_key_env: K is not set"):
        Worker(config, "p", connection=None, env={})  # type: ignore[arg-type]
    assert Worker(config, "p", connection=None, env={"K": "sk"})._keys == {"a": "sk"}  # type: ignore[arg-type]


def chains_doc(**groups: dict[str, Any]) -> dict[str, Any]:
    """Three single-deployment models with the given extra settings."""
    models = {name: {"deployments": [{"deployment": name}]} for name in ("x", "y", "z")}
    for name, extra in groups.items():
        models[name].update(extra)
    return doc(
        deployments={
            name: {"provider": "openai", "model": "gpt-4o-mini", "pool": "p"}
            for name in ("x", "y", "z")
        },
        models=models,
    )


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ({"x": {"fallbacks": ["x"]}}, "models.x.fallbacks: the chain loops: x -> x"),
        (
            {"x": {"fallbacks": ["y"]}, "y": {"fallbacks": ["z"]}, "z": {"fallbacks": ["x"]}},
            "models.x.fallbacks: the chain loops: x -> y -> z -> x",
        ),
        (
            {"x": {"context_window_fallbacks": ["y"]}, "y": {"context_window_fallbacks": ["x"]}},
            "models.x.context_window_fallbacks: the chain loops: x -> y -> x",
        ),
        ({"x": {"fallbacks": ["nope"]}}, "models.x.fallbacks[0]: no model named 'nope'"),
        ({"x": {"retry": {"retries": {"bad_request": 2}}}}, "models.x.retry.retries.bad_request"),
    ],
)
def test_fallback_chains_that_loop_or_name_nothing_are_refused(
    groups: dict[str, dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(chains_doc(**groups), {}, PROVIDERS)
    assert str(caught.value).startswith(message)


def test_a_chain_lists_the_group_then_its_fallbacks_depth_first() -> None:
    from schemas.errors import ErrorKind  # noqa: PLC0415

    config = parse(
        chains_doc(
            x={"fallbacks": ["y"], "content_policy_fallbacks": ["z"]},
            y={"fallbacks": ["z"]},
        ),
        {},
        PROVIDERS,
    )
    routes = build_route_table(config)
    x = config.models["x"]

    assert [g.name for g in routes.chain(x, ErrorKind.SERVER_ERROR)] == ["x", "y", "z"]
    assert [g.name for g in routes.chain(x, ErrorKind.CONTENT_POLICY)] == ["z"]
    assert [g.name for g in routes.chain(x, ErrorKind.CONTEXT_WINDOW_EXCEEDED)] == []
    assert [g.name for g in routes.chain(x, ErrorKind.SERVER_ERROR, ["z"])] == ["x", "z"]


def test_retry_settings_left_out_keep_their_defaults() -> None:
    config = parse(chains_doc(x={"retry": {"retries": {"timeout": 0}}}), {}, PROVIDERS)
    assert config.models["x"].retry.retries == {
        "rate_limited": 2,
        "overloaded": 2,
        "timeout": 0,
        "server_error": 2,
    }


def test_a_backoff_longer_than_the_broker_holds_retries_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"models.x.retry.max_backoff_s: with its jitter"):
        parse(chains_doc(x={"retry": {"max_backoff_s": 290, "jitter": 0.2}}), {}, PROVIDERS)


def test_after_a_fallback_the_chain_and_retry_policy_are_the_new_models() -> None:
    """A job that moved to `y` (too long for `x`) falls back along `y`'s
    chain, never back to `x`'s other deployment, and retries by `y`'s policy."""
    from modelyard.client import new_job  # noqa: PLC0415
    from router.routing import current_model  # noqa: PLC0415
    from schemas.chat import Message  # noqa: PLC0415
    from schemas.errors import ErrorKind  # noqa: PLC0415
    from schemas.jobs import Attempt, Route  # noqa: PLC0415

    doc = chains_doc(
        x={"context_window_fallbacks": ["y"], "fallbacks": ["z"]},
        y={"fallbacks": ["z"], "retry": {"retries": {"server_error": 0}}},
    )
    doc["deployments"]["x2"] = {"provider": "openai", "model": "gpt-4o-mini", "pool": "p"}
    doc["models"]["x"]["deployments"].append({"deployment": "x2"})
    routes = build_route_table(parse(doc, {}, PROVIDERS))
    job = new_job("x", [Message(role="user", content="long")])
    job.attempts = [
        Attempt(deployment="x", provider="openai", started_at=0, finished_at=1, outcome="error"),
        Attempt(deployment="y", provider="openai", started_at=1, finished_at=2, outcome="error"),
    ]
    job.route = Route(deployment="y", pool="p", routed_at=1, model="y")

    left = routes.untried(job, ErrorKind.SERVER_ERROR, None)

    assert current_model(job) == "y"
    assert left is not None
    group, targets = left
    assert (group.name, [t.deployment for t in targets]) == ("z", ["z"])  # not x2


def _failed(deployment: str, model: str, error: Any) -> Any:
    from schemas.jobs import Attempt  # noqa: PLC0415

    return Attempt(
        deployment=deployment,
        provider="openai",
        model=model,
        started_at=0,
        finished_at=1,
        outcome="error",
        error=error,
    )


def _moved_to(model: str, *attempts: Any) -> Any:
    """A job that asked for `x`, made `attempts`, and is now served for `model`."""
    from modelyard.client import new_job  # noqa: PLC0415
    from schemas.chat import Message  # noqa: PLC0415
    from schemas.jobs import Route  # noqa: PLC0415

    job = new_job("x", [Message(role="user", content="hello")])
    job.attempts = list(attempts)
    job.route = Route(deployment=model, pool="p", routed_at=1, model=model)
    return job


def test_a_flat_fallback_list_is_followed_to_its_end() -> None:
    """`x.fallbacks: [y, z]`: once `y` failed too, the job goes on to `z`
    (not only along `y`'s own chain, which is empty), and gives up after."""
    from schemas.errors import ErrorKind  # noqa: PLC0415

    routes = build_route_table(parse(chains_doc(x={"fallbacks": ["y", "z"]}), {}, PROVIDERS))
    server = ErrorKind.SERVER_ERROR
    job = _moved_to("y", _failed("x", "x", server), _failed("y", "y", server))
    left = routes.untried(job, server, None)
    assert left is not None
    assert left[0].name == "z"
    job = _moved_to("z", *job.attempts, _failed("z", "z", server))
    assert routes.untried(job, server, None) is None


def test_a_flat_context_window_chain_is_followed_and_never_goes_back() -> None:
    """`x.context_window_fallbacks: [y, z]`: a prompt too long for `x` and
    then for `y` goes to `z`; a later failure on `z` never goes back to `x`
    (its other deployment would refuse the prompt too), even though `z`
    falls back to `x`."""
    from schemas.errors import ErrorKind  # noqa: PLC0415

    doc = chains_doc(x={"context_window_fallbacks": ["y", "z"]}, z={"fallbacks": ["x"]})
    doc["deployments"]["x2"] = {"provider": "openai", "model": "gpt-4o-mini", "pool": "p"}
    doc["models"]["x"]["deployments"].append({"deployment": "x2"})
    routes = build_route_table(parse(doc, {}, PROVIDERS))
    too_long = ErrorKind.CONTEXT_WINDOW_EXCEEDED
    job = _moved_to("y", _failed("x", "x", too_long), _failed("y", "y", too_long))
    left = routes.untried(job, too_long, None)
    assert left is not None
    assert left[0].name == "z"
    job = _moved_to("z", *job.attempts, _failed("z", "z", ErrorKind.SERVER_ERROR))
    assert routes.untried(job, ErrorKind.SERVER_ERROR, None) is None  # not x2
