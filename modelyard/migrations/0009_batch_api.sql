-- The OpenAI Batch API of the HTTP gateway: uploaded and produced files,
-- batches with the lease of the gateway running each, and each batch's
-- lines with their state (pending, sent, done) and output line.

CREATE TABLE batch_files (
    id          text PRIMARY KEY,
    purpose     text NOT NULL,
    filename    text NOT NULL,
    bytes       bigint NOT NULL,
    content     bytea NOT NULL,
    owner_key   text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    deleted_at  timestamptz
);

CREATE TABLE batches (
    id                text PRIMARY KEY,
    input_file_id     text NOT NULL,
    endpoint          text NOT NULL,
    completion_window text NOT NULL,
    status            text NOT NULL,
    owner_key         text,
    team              text,
    project           text,
    user_id           text,
    metadata          text,
    errors            text,
    output_file_id    text,
    error_file_id     text,
    cost              numeric NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    finalizing_at     timestamptz,
    completed_at      timestamptz,
    failed_at         timestamptz,
    cancelling_at     timestamptz,
    cancelled_at      timestamptz,
    expires_at        timestamptz NOT NULL,
    runner            text,
    lease_until       timestamptz
);

CREATE INDEX batches_by_owner ON batches (owner_key, created_at DESC, id DESC);
CREATE INDEX batches_live ON batches (created_at)
    WHERE status IN ('validating', 'in_progress', 'cancelling', 'finalizing');

CREATE TABLE batch_lines (
    batch_id  text NOT NULL REFERENCES batches (id),
    line      integer NOT NULL,
    custom_id text NOT NULL,
    job_id    text NOT NULL,
    state     text NOT NULL,
    body      bytea,
    output    bytea,
    failed    boolean NOT NULL DEFAULT false,
    cost      numeric,
    PRIMARY KEY (batch_id, line)
);

CREATE INDEX batch_lines_by_job ON batch_lines (batch_id, job_id);
CREATE INDEX batch_lines_pending ON batch_lines (batch_id, line) WHERE state = 'pending';
