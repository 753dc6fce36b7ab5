-- Batch-lane jobs claimed by workers before their provider call, so a job a
-- restarted router dispatches a second time is not paid for twice. One row
-- per job; `routed_at` tells the first dispatch from a repeat. Rows are
-- pruned by workers after a day (a repeat comes within minutes).
CREATE TABLE IF NOT EXISTS job_claims (
    job_id     text PRIMARY KEY,
    routed_at  double precision NOT NULL,
    claimed_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS job_claims_claimed_at ON job_claims (claimed_at);
