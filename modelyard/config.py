"""The one configuration file: models, deployments, pools, and where things run.

Loaded and validated before anything starts: a bad entry is a `ConfigError`
naming its path in the file (`deployments.gpt4o.pool: ...`), never a traceback
from deep inside a worker. Broker and database URLs can be overridden by the
environment (`MODELYARD_BROKER_URL`, `MODELYARD_DATABASE_URL`) so one file
serves every environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

import msgspec
import yaml
from msgspec import Meta

from modelyard.topology import RETRY_DELAYS_MS
from schemas.errors import RETRYABLE

DEFAULT_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/modelyard"

Name = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._\-]+$", min_length=1, max_length=100)]
PerMTok = Decimal  # checked non-negative in _link (msgspec has no Decimal bounds)


class ProviderCheck(Protocol):
    """The part of a provider adapter the config needs: its deployment check."""

    def check_deployment(self, deployment: Deployment) -> str | None: ...


class ConfigError(ValueError):
    """The configuration is unusable; the message names the path at fault."""


class PriceOverride(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """USD per million tokens, for models genai-prices does not know or that
    your contract prices differently. Unset cache prices fall back to input."""

    input_per_mtok: PerMTok
    output_per_mtok: PerMTok
    cache_read_per_mtok: PerMTok | None = None
    cache_write_per_mtok: PerMTok | None = None


class Deployment(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One concrete place a model runs: a provider, its model id, a key."""

    provider: str
    model: Annotated[str, Meta(min_length=1)]
    pool: Name
    api_base: Annotated[str, Meta(pattern=r"^https?://[^/\s]+")] | None = None
    api_key_env: str | None = None
    timeout_s: Annotated[float, Meta(gt=0)] = 60.0
    stream_timeout_s: Annotated[float, Meta(gt=0)] = 600.0
    price: PriceOverride | None = None
    price_provider: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    # Labels keys can be pinned to (`eu`, `self-hosted`): a key allowed some
    # tags only reaches deployments carrying one of them.
    tags: list[Name] = msgspec.field(default_factory=list)
    # Requests and tokens per minute at this deployment, held across every
    # worker process of its pool (in no 60 seconds more than this).
    rpm: Annotated[int, Meta(ge=1)] | None = None
    tpm: Annotated[int, Meta(ge=1)] | None = None
    # Calls in flight at this deployment at once, all worker processes together.
    max_concurrent: Annotated[int, Meta(ge=1)] | None = None
    name: str = ""  # filled from the mapping key on load


class Target(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A deployment in a model group, with its share of traffic."""

    deployment: Name
    weight: Annotated[float, Meta(gt=0)] = 1.0


def _default_retries() -> dict[str, int]:
    return {"rate_limited": 2, "overloaded": 2, "timeout": 1, "server_error": 2}


class RetryPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How a model group's retryable failures are tried again on the same
    deployment before the job falls back: `retries` per error kind, waiting
    `backoff_s`, doubling each time up to `max_backoff_s`, give or take
    `jitter` (a share), and never less than the provider's retry-after."""

    retries: dict[str, Annotated[int, Meta(ge=0, le=20)]] = msgspec.field(
        default_factory=_default_retries
    )
    backoff_s: Annotated[float, Meta(gt=0, le=300)] = 1.0
    max_backoff_s: Annotated[float, Meta(gt=0, le=300)] = 30.0
    jitter: Annotated[float, Meta(ge=0, le=1)] = 0.2


Strategy = Literal["weighted", "least_busy", "lowest_latency", "lowest_cost"]


class ModelGroup(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A public model name producers ask for, and where it may run.

    `strategy` picks among the deployments not cooling down: `weighted`
    (random, in proportion to weight), `least_busy` (fewest calls in flight
    and jobs queued), `lowest_latency` (moving average of recent successful
    calls) or `lowest_cost` (the job's estimated tokens at each price).

    When a deployment's retries are used up, the job moves to another
    deployment of the group, then along `fallbacks` (model names, each
    followed by its own fallbacks). A context window or content policy
    refusal follows its own chain instead, and other refusals end the job."""

    deployments: Annotated[list[Target], Meta(min_length=1)]
    aliases: list[Name] = msgspec.field(default_factory=list)
    strategy: Strategy = "weighted"
    retry: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    fallbacks: list[Name] = msgspec.field(default_factory=list)
    context_window_fallbacks: list[Name] = msgspec.field(default_factory=list)
    content_policy_fallbacks: list[Name] = msgspec.field(default_factory=list)
    name: str = ""


class Pool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A worker pool: one queue, consumed with bounded concurrency."""

    concurrency: Annotated[int, Meta(ge=1, le=10_000)] = 64


class RouterSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How many messages a router process works on at once, and the size limits."""

    # Messages in hand (AMQP prefetch, 16-bit); a batch counts once, so the
    # router holds at most concurrency x max_batch_bytes of submitted bodies.
    concurrency: Annotated[int, Meta(ge=1, le=65535)] = 64
    max_job_bytes: Annotated[int, Meta(ge=1024)] = 8 * 1024 * 1024
    # A submitted batch message; each job in it is still held to max_job_bytes.
    max_batch_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024


class BatchLaneSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How batch-lane jobs are packed: up to `max_jobs` per message, a message
    waiting at most `linger_ms` to fill. Applies to the router's dispatch and
    to workers' results. A worker holds as many batch messages as it takes to
    fill its slots, which bounds what a crash makes it run again."""

    max_jobs: Annotated[int, Meta(ge=1, le=1000)] = 32
    linger_ms: Annotated[float, Meta(ge=0, le=1000)] = 5.0


class LedgerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Batching of ledger writes: up to `batch_size` events or `flush_ms`."""

    batch_size: Annotated[int, Meta(ge=1, le=10_000)] = 500
    flush_ms: Annotated[float, Meta(gt=0)] = 50.0


class HealthSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Deployment health, shared by every router through workers' reports.

    A deployment cools down (no router sends it work) for `cooldown_s` when,
    over the last `window_s` seconds, at least `min_calls` calls were made
    and `failure_rate` of them failed for reasons of its own (rate limits,
    overload, server errors, timeouts, auth); or, with
    `honour_retry_after`, for as long as a provider's 429 asked. After the
    cooldown each router sends it one probe job; a success re-admits it, a
    failure cools it down again, and no answer within `probe_timeout_s`
    allows another probe. Workers report every `report_every_ms`."""

    report_every_ms: Annotated[float, Meta(ge=50, le=10_000)] = 500.0
    window_s: Annotated[int, Meta(ge=2, le=600)] = 30
    min_calls: Annotated[int, Meta(ge=1)] = 5
    failure_rate: Annotated[float, Meta(gt=0, le=1)] = 0.5
    cooldown_s: Annotated[float, Meta(gt=0, le=3600)] = 10.0
    probe_timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 60.0
    honour_retry_after: bool = True


class TeamPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a team's jobs may use, all its keys together: requests and
    tokens per minute, the models (names or aliases) and the deployment
    tags (`eu`, `self-hosted`) it is limited to. A key's own limits apply
    on top."""

    rpm: Annotated[int, Meta(ge=1)] | None = None
    tpm: Annotated[int, Meta(ge=1)] | None = None
    models: list[Name] | None = None
    tags: list[Name] | None = None


class AccessSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Admission: who may submit, which models, within which budgets.

    `require_key`: every job must carry a live virtual key (`api_key`);
    without it a job's principal is whatever its metadata says.
    `require_approval`: a model group must be approved (`modelyard models
    approve`) before anyone may use it. Keys, approvals and budgets are read
    from Postgres and cached for `cache_s`: a revoked key or a changed
    budget takes effect on every router within that time.

    Budgets reserve each job's worst case: its prompt at one token per byte
    (plus `image_tokens` per image), its `max_tokens` (a job without one
    gets `max_output_tokens`, enforced), at the dearest deployment it may
    reach. A deployment without a price is refused (`unpriced: refuse`) or
    reserved at `unpriced_reservation_usd`. A reservation nobody settles
    expires after `reservation_ttl_s`: a crashed process strands nothing
    for longer, and a worker refuses to start a job whose reservation may
    expire before its call ends (it waited in queues that long)."""

    require_key: bool = False
    require_approval: bool = False
    cache_s: Annotated[float, Meta(gt=0, le=300)] = 2.0
    max_output_tokens: Annotated[int, Meta(ge=1)] = 4096
    image_tokens: Annotated[int, Meta(ge=0)] = 3000
    unpriced: Literal["refuse", "reserve"] = "refuse"
    unpriced_reservation_usd: Annotated[float, Meta(gt=0)] = 1.0
    reservation_ttl_s: Annotated[float, Meta(ge=1)] = 3600.0
    # Per team: minute limits, allowed models and deployment tags, checked
    # at admission (keys carry their own too).
    teams: dict[Name, TeamPolicy] = msgspec.field(default_factory=dict)


class GatewaySettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The HTTP gateway (`modelyard gateway`): where it listens, the largest
    body it reads, and how long a request may take unless the client says
    less (the OpenAI SDKs send their timeout; it becomes the job's deadline)."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 8 * 1024 * 1024
    # The largest Batch API input file (`POST /v1/files`); kept in Postgres.
    max_file_bytes: Annotated[int, Meta(ge=1024)] = 64 * 1024 * 1024
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 600.0
    # The environment variable holding the master key that guards `/admin/`;
    # unset, the admin API answers 403 to everyone.
    master_key_env: str = "MODELYARD_MASTER_KEY"


class OpsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`/healthz`, `/readyz` and `/metrics` of router, worker and ledger
    processes (the gateway serves them on its own port). Off unless a port
    is set here or with `--ops-port`."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] | None = None


class Config(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The whole file."""

    deployments: dict[Name, Deployment]
    models: dict[Name, ModelGroup]
    pools: dict[Name, Pool] = msgspec.field(default_factory=dict)
    broker_url: str = DEFAULT_BROKER_URL
    database_url: str = DEFAULT_DATABASE_URL
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_prompts: bool = False
    router: RouterSettings = msgspec.field(default_factory=RouterSettings)
    batch_lane: BatchLaneSettings = msgspec.field(default_factory=BatchLaneSettings)
    ledger: LedgerSettings = msgspec.field(default_factory=LedgerSettings)
    health: HealthSettings = msgspec.field(default_factory=HealthSettings)
    access: AccessSettings = msgspec.field(default_factory=AccessSettings)
    gateway: GatewaySettings = msgspec.field(default_factory=GatewaySettings)
    ops: OpsSettings = msgspec.field(default_factory=OpsSettings)
    # Whether a job's own `fallbacks` list is followed (instead of its
    # model's chain); false makes the chains the platform's alone.
    allow_job_fallbacks: bool = True
    # RabbitMQ's `consumer_timeout` as the broker is configured (30 minutes
    # unless changed there): a message held unacked longer closes its
    # worker's channel and runs again elsewhere, so every call must end
    # well before it. Set this to match when the broker's is changed.
    broker_consumer_timeout_s: Annotated[float, Meta(gt=0)] = 1800.0

    def pool(self, name: str) -> Pool:
        """A pool's settings; pools used by deployments need no explicit entry."""
        return self.pools.get(name) or Pool()

    def pool_names(self) -> list[str]:
        """Every pool some deployment runs in, sorted."""
        return sorted({d.pool for d in self.deployments.values()} | set(self.pools))


class _Loader(yaml.SafeLoader):
    """Keeps YAML floats as their text, so `0.15` becomes Decimal('0.15') exactly."""


_Loader.add_constructor(
    "tag:yaml.org,2002:float",
    lambda loader, node: loader.construct_scalar(node),  # type: ignore[arg-type]
)

_MSGSPEC_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _readable(msgspec_error: str) -> str:
    """Turn msgspec's `... - at `$.a[...]`` into `a...: ...`."""
    match = _MSGSPEC_PATH.search(msgspec_error)
    if not match:
        return msgspec_error
    path = match["path"].lstrip(".") or "(top level)"
    return f"{path}: {msgspec_error[: match.start()]}"


_SECTIONS: dict[str, type[msgspec.Struct]] = {
    "deployments": Deployment,
    "models": ModelGroup,
    "pools": Pool,
}


def _check_entries(entries: Any, section: str, kind: type[msgspec.Struct]) -> None:
    """Validate a mapping section entry by entry, so errors name the entry's key
    (msgspec alone reports a dict value's path as `[...]`)."""
    if not isinstance(entries, dict):
        return  # the whole-document conversion reports the wrong type
    for key, value in entries.items():
        try:
            msgspec.convert(value, kind, strict=False)
        except msgspec.ValidationError as exc:
            message = _readable(str(exc))
            if message.startswith("(top level): "):
                message = message.removeprefix("(top level)")
            elif not message.startswith("["):
                message = f".{message}" if ": " in message else f": {message}"
            raise ConfigError(f"{section}.{key}{message}") from exc


def parse(raw: Any, env: Mapping[str, str], known_providers: Mapping[str, ProviderCheck]) -> Config:
    """Validate a parsed YAML document into a `Config`, or raise `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError("(top level): expected a mapping of settings")
    for section, kind in _SECTIONS.items():
        _check_entries(raw.get(section), section, kind)
    try:
        config = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_readable(str(exc))) from exc
    config.broker_url = env.get("MODELYARD_BROKER_URL", config.broker_url)
    config.database_url = env.get("MODELYARD_DATABASE_URL", config.database_url)
    _link(config, known_providers)
    return config


def _link(config: Config, known_providers: Mapping[str, ProviderCheck]) -> None:
    """Cross-check references that types alone cannot: names, pools, aliases."""
    for name, deployment in config.deployments.items():
        deployment.name = name
        _check_price(f"deployments.{name}.price", deployment.price)
        if deployment.provider not in known_providers:
            choices = ", ".join(sorted(known_providers))
            raise ConfigError(
                f"deployments.{name}.provider: unknown provider {deployment.provider!r} "
                f"(one of: {choices})"
            )
        if problem := known_providers[deployment.provider].check_deployment(deployment):
            raise ConfigError(f"deployments.{name}.{problem}")
    seen: dict[str, str] = {}
    for name, group in config.models.items():
        group.name = name
        for i, target in enumerate(group.deployments):
            if target.deployment not in config.deployments:
                raise ConfigError(
                    f"models.{name}.deployments[{i}].deployment: "
                    f"no deployment named {target.deployment!r}"
                )
        for label in (name, *group.aliases):
            if label in seen:
                raise ConfigError(f"models.{name}: name {label!r} is already used by {seen[label]}")
            seen[label] = f"models.{name}"
        _check_retries(f"models.{name}.retry", group.retry)
    _check_chains(config)
    # A streamed call may run for its deployment's `stream_timeout_s`.
    longest = max(
        (max(d.timeout_s, d.stream_timeout_s) for d in config.deployments.values()), default=0.0
    )
    if longest >= config.broker_consumer_timeout_s:
        raise ConfigError(
            f"broker_consumer_timeout_s: the broker's consumer timeout "
            f"({config.broker_consumer_timeout_s:g}s) must be longer than the longest "
            f"timeout_s or stream_timeout_s ({longest:g}s), or the broker takes a job "
            "back from its worker mid-call and it runs twice: shorten the deployment's "
            "timeout, or raise RabbitMQ's consumer_timeout and this setting with it"
        )
    if config.access.reservation_ttl_s <= longest:
        raise ConfigError(
            "access.reservation_ttl_s: must be longer than the longest timeout_s or "
            f"stream_timeout_s ({longest:g}s), or a reservation could expire while its "
            "call is still running"
        )


# The longest a retry can wait: the last step of the broker's retry ladder.
MAX_RETRY_DELAY_S = RETRY_DELAYS_MS[-1] / 1000
# Kinds a retry on the same deployment can help with.
RETRYABLE_KINDS = frozenset(kind.value for kind, retryable in RETRYABLE.items() if retryable)
CHAINS = ("fallbacks", "context_window_fallbacks", "content_policy_fallbacks")


def _check_retries(path: str, policy: RetryPolicy) -> None:
    for kind in policy.retries:
        if kind not in RETRYABLE_KINDS:
            kinds = ", ".join(sorted(RETRYABLE_KINDS))
            raise ConfigError(
                f"{path}.retries.{kind}: only these kinds are retried: {kinds} "
                "(others are never retried on the same deployment)"
            )
    if policy.max_backoff_s < policy.backoff_s:
        raise ConfigError(f"{path}.max_backoff_s: must be at least backoff_s")
    if policy.max_backoff_s * (1 + policy.jitter) > MAX_RETRY_DELAY_S:
        raise ConfigError(
            f"{path}.max_backoff_s: with its jitter it must stay within "
            f"{MAX_RETRY_DELAY_S:g}s, the longest delay the broker holds a retry for"
        )
    # Kinds left out keep their default; an explicit 0 turns a kind's retries off.
    policy.retries = {**_default_retries(), **policy.retries}


def group_named(config: Config, label: str) -> ModelGroup | None:
    """The model group a name or alias stands for."""
    for group in config.models.values():
        if label == group.name or label in group.aliases:
            return group
    return None


def _check_chains(config: Config) -> None:
    """Every fallback names a model, and no chain can loop back on itself."""
    for name, group in config.models.items():
        for chain in CHAINS:
            for i, label in enumerate(getattr(group, chain)):
                if group_named(config, label) is None:
                    raise ConfigError(f"models.{name}.{chain}[{i}]: no model named {label!r}")
    for name in config.models:
        for chain in CHAINS:
            _walk(config, chain, [name])


def _walk(config: Config, chain: str, path: list[str]) -> None:
    group = config.models[path[-1]]
    for label in getattr(group, chain):
        target = group_named(config, label)
        assert target is not None  # checked above
        if target.name in path:
            loop = " -> ".join([*path, target.name])
            raise ConfigError(f"models.{path[0]}.{chain}: the chain loops: {loop}")
        _walk(config, chain, [*path, target.name])


def _check_price(path: str, price: PriceOverride | None) -> None:
    if price is None:
        return
    for field in price.__struct_fields__:
        value = getattr(price, field)
        if value is not None and (not value.is_finite() or value < 0):
            raise ConfigError(f"{path}.{field}: must be a non-negative number, got {value}")


def load(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read, parse and validate the config file at `path`."""
    from workers.providers import PROVIDERS  # noqa: PLC0415  (config must not import workers eagerly)

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        raw = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse(raw, os.environ if env is None else env, PROVIDERS)
