-- A batch not finished within its completion window is closed `expired`.
ALTER TABLE batches ADD COLUMN expired_at timestamptz;
