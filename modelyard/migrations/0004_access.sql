-- Who may spend what: virtual keys, model approvals, budgets and their
-- reservations. Written by the admin CLI and by admission; budgets settled by
-- the ledger in the same transaction as its rows.

-- A virtual key: the secret is shown once and stored only as its SHA-256
-- (keys are 192 random bits: a slow hash adds nothing but latency). The
-- principal it stands for is a team, a project and/or a user.
CREATE TABLE api_keys (
    id             text        PRIMARY KEY,
    secret_hash    bytea       NOT NULL UNIQUE,
    prefix         text        NOT NULL,
    name           text        NOT NULL DEFAULT '',
    team           text,
    project        text,
    user_id        text,
    allowed_models text[],
    allowed_tags   text[],
    metadata       jsonb       NOT NULL DEFAULT '{}',
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz,
    replaced_by    text
);

-- Every approval and revocation of a model, kept: the latest row says
-- whether a model may be used now.
CREATE TABLE model_approvals (
    id       bigserial   PRIMARY KEY,
    model    text        NOT NULL,
    action   text        NOT NULL CHECK (action IN ('approve', 'revoke')),
    actor    text        NOT NULL,
    note     text        NOT NULL DEFAULT '',
    at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX model_approvals_model ON model_approvals (model, id DESC);

-- A hard limit per scope: global (subject ''), team, project, user or key.
CREATE TABLE budgets (
    scope       text           NOT NULL CHECK (scope IN ('global', 'team', 'project', 'user', 'key')),
    subject     text           NOT NULL,
    period      text           NOT NULL CHECK (period IN ('none', 'daily', 'weekly', 'monthly')),
    limit_usd   numeric(24, 12) NOT NULL CHECK (limit_usd >= 0),
    alert_share numeric(6, 5)  NOT NULL DEFAULT 0.8 CHECK (alert_share > 0 AND alert_share <= 1),
    timezone    text           NOT NULL DEFAULT 'UTC',
    updated_at  timestamptz    NOT NULL DEFAULT now(),
    PRIMARY KEY (scope, subject)
);

-- Spend and reservations of one budget in one period. A new period is a new
-- row: the old period's figures stay as they were, nothing is reset.
CREATE TABLE budget_usage (
    scope        text            NOT NULL,
    subject      text            NOT NULL,
    period_start timestamptz     NOT NULL,
    spent        numeric(24, 12) NOT NULL DEFAULT 0,
    reserved     numeric(24, 12) NOT NULL DEFAULT 0,
    alerted      boolean         NOT NULL DEFAULT false,
    PRIMARY KEY (scope, subject, period_start)
);

-- What admission set aside for a job in each budget it falls under, until
-- the job ends (released) or, if nobody says so, until `expires_at`.
CREATE TABLE budget_reservations (
    job_id       text            NOT NULL,
    scope        text            NOT NULL,
    subject      text            NOT NULL,
    period_start timestamptz     NOT NULL,
    amount       numeric(24, 12) NOT NULL,
    expires_at   timestamptz     NOT NULL,
    PRIMARY KEY (job_id, scope, subject)
);
CREATE INDEX budget_reservations_expiry ON budget_reservations (expires_at);

-- The period a moment falls in, in a budget's time zone: one definition
-- for admission, the ledger and reports.
CREATE FUNCTION budget_period_start(period text, tz text, at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE period
        WHEN 'none' THEN timestamptz '1970-01-01 00:00:00+00'
        WHEN 'daily' THEN date_trunc('day', at AT TIME ZONE tz) AT TIME ZONE tz
        WHEN 'weekly' THEN date_trunc('week', at AT TIME ZONE tz) AT TIME ZONE tz
        ELSE date_trunc('month', at AT TIME ZONE tz) AT TIME ZONE tz
    END
$$;

CREATE FUNCTION budget_period_end(period text, tz text, at timestamptz)
RETURNS timestamptz LANGUAGE sql STABLE AS $$
    SELECT CASE period
        WHEN 'none' THEN NULL
        WHEN 'daily' THEN (date_trunc('day', at AT TIME ZONE tz) + interval '1 day') AT TIME ZONE tz
        WHEN 'weekly' THEN (date_trunc('week', at AT TIME ZONE tz) + interval '1 week') AT TIME ZONE tz
        ELSE (date_trunc('month', at AT TIME ZONE tz) + interval '1 month') AT TIME ZONE tz
    END
$$;
