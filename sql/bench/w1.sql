-- W1: keep the first event per id (re-deliveries dropped), project the detail, write Parquet.
-- Paths come from `nagare bench w1`, which substitutes ${INPUT} and ${OUTPUT}.
SET dedup_ttl = '10 minutes';

CREATE TABLE events (
  version TEXT,
  id TEXT,
  "detail-type" TEXT,
  source TEXT,
  account TEXT,
  time TIMESTAMP,
  region TEXT,
  resources ARRAY<TEXT>,
  detail STRUCT<tenant_id BIGINT, document_id TEXT, amount DOUBLE, currency TEXT, status TEXT>,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${INPUT}', format = 'json');

CREATE TABLE deduped WITH (connector = 'filesystem', path = '${OUTPUT}', format = 'parquet');

INSERT INTO deduped
SELECT id, "detail-type", time,
       detail.tenant_id AS tenant_id, detail.document_id AS document_id,
       detail.amount AS amount, detail.currency AS currency, detail.status AS status
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1;
