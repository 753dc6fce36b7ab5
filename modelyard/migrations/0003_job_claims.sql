-- Batch-lane jobs claimed by workers before their provider call, so a job a
-- restarted router dispatches a second time is not paid for twice. One row
-- per job attempt; `routed_at` tells one dispatch from another. Rows are
-- pruned by workers after a day (a repeat comes within minutes).
CREATE TABLE IF NOT EXISTS job_claims (
    job_id     text PRIMARY KEY,
    routed_at  double precision NOT NULL,
    repeat     boolean NOT NULL DEFAULT false,  -- claimed by a copy the router marked a repeat
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS job_claims_claimed_at ON job_claims (claimed_at);
