-- A key and every key that replaced it by rotation share a lineage (the
-- first key's id). Files and batches belong to the lineage, so a rotated
-- key still reaches what its predecessor uploaded and started.
ALTER TABLE api_keys ADD COLUMN lineage text;

WITH RECURSIVE chain (id, root) AS (
    SELECT k.id, k.id FROM api_keys k
    WHERE NOT EXISTS (SELECT 1 FROM api_keys p WHERE p.replaced_by = k.id)
    UNION ALL
    SELECT k.replaced_by, c.root FROM chain c JOIN api_keys k ON k.id = c.id
    WHERE k.replaced_by IS NOT NULL
)
UPDATE api_keys a SET lineage = chain.root FROM chain WHERE a.id = chain.id;
UPDATE api_keys SET lineage = id WHERE lineage IS NULL;
ALTER TABLE api_keys ALTER COLUMN lineage SET NOT NULL;

UPDATE batches b SET owner_key = k.lineage FROM api_keys k WHERE b.owner_key = k.id;
UPDATE batch_files f SET owner_key = k.lineage FROM api_keys k WHERE f.owner_key = k.id;
CREATE INDEX api_keys_by_lineage ON api_keys (lineage, created_at DESC);
