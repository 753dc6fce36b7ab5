-- Per-deployment rate limits shared by every worker process: capacity leased
-- per 5-second bucket (workers/ratelimit.py). Old buckets are pruned.
CREATE TABLE rate_usage (
    deployment text        NOT NULL,
    bucket     timestamptz NOT NULL,
    requests   bigint      NOT NULL DEFAULT 0,
    tokens     bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (deployment, bucket)
);
