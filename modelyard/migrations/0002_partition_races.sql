-- Two ledgers starting together may both try to create a month's partition:
-- serialize them, and treat "already exists" as done.
CREATE OR REPLACE FUNCTION ledger_ensure_partition(day date) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    first date := date_trunc('month', day)::date;
    name  text := format('ledger_%s', to_char(first, 'YYYY_MM'));
BEGIN
    PERFORM pg_advisory_xact_lock(7426002);
    IF to_regclass(name) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
            name, first, (first + interval '1 month')::date
        );
    END IF;
EXCEPTION WHEN duplicate_table THEN
    NULL;
END $$;
