-- Per-deployment caps on concurrent calls, shared by worker processes: each
-- worker leases some of a deployment's slots (workers/concurrency.py).
CREATE TABLE concurrency_leases (
    deployment text        NOT NULL,
    worker     text        NOT NULL,
    slots      integer     NOT NULL CHECK (slots >= 0),
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (deployment, worker)
);
