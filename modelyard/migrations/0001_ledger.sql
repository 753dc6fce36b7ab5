-- The ledger: one row per billed provider call, append-only, partitioned by
-- month of the call. The primary key makes writes idempotent: a redelivered
-- cost event carries the same (occurred_at, event_id) and is ignored.
CREATE TABLE ledger (
    event_id            uuid             NOT NULL,
    occurred_at         timestamptz      NOT NULL,
    recorded_at         timestamptz      NOT NULL DEFAULT now(),
    job_id              text             NOT NULL,
    key_id              text,
    team                text,
    project             text,
    user_id             text,
    batch_id            text,
    custom_id           text,
    provider            text             NOT NULL,
    deployment          text             NOT NULL,
    provider_model      text             NOT NULL,
    model               text             NOT NULL,
    provider_request_id text,
    input_tokens        bigint           NOT NULL,
    output_tokens       bigint           NOT NULL,
    cache_read_tokens   bigint           NOT NULL,
    cache_write_tokens  bigint           NOT NULL,
    reasoning_tokens    bigint           NOT NULL,
    cost                numeric(24, 12),
    currency            text             NOT NULL DEFAULT 'USD',
    price_source        text             NOT NULL,
    status              text             NOT NULL,
    latency_ms          double precision NOT NULL,
    raw_usage           jsonb,
    PRIMARY KEY (occurred_at, event_id)
) PARTITION BY RANGE (occurred_at);

CREATE INDEX ledger_job_id ON ledger (job_id);
CREATE INDEX ledger_batch_id ON ledger (batch_id) WHERE batch_id IS NOT NULL;

-- Rows for a month nobody made a partition for land here rather than fail.
CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;

-- Create the partition for the month containing `day`, if missing.
CREATE FUNCTION ledger_ensure_partition(day date) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', day)::date;
    name  text := format('ledger_%s', to_char(first, 'YYYY_MM'));
BEGIN
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
            name, first, (first + interval '1 month')::date
        );
    END IF;
END $$;

SELECT ledger_ensure_partition((date_trunc('month', now()) + make_interval(months => m))::date)
FROM generate_series(-1, 12) AS m;

-- Daily rollup, maintained in the same transaction as the ledger insert (only
-- rows actually inserted are added), so finance reports read thousands of rows
-- instead of tens of millions. Empty strings stand for "not set" so the key
-- can be a plain unique constraint.
CREATE TABLE ledger_daily (
    day                date            NOT NULL,
    team               text            NOT NULL,
    project            text            NOT NULL,
    key_id             text            NOT NULL,
    model              text            NOT NULL,
    provider           text            NOT NULL,
    deployment         text            NOT NULL,
    provider_model     text            NOT NULL,
    calls              bigint          NOT NULL,
    input_tokens       bigint          NOT NULL,
    output_tokens      bigint          NOT NULL,
    cache_read_tokens  bigint          NOT NULL,
    cache_write_tokens bigint          NOT NULL,
    reasoning_tokens   bigint          NOT NULL,
    cost               numeric(24, 12) NOT NULL,
    unpriced_calls     bigint          NOT NULL,
    PRIMARY KEY (day, team, project, key_id, model, provider, deployment, provider_model)
);
