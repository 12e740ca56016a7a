-- W1 with a keyed window aggregate: drop re-deliveries (keyed by id), then count and sum per tenant per minute
-- (keyed by tenant). Both steps are keyed, so rows cross between subtasks twice — between workers, when the job
-- is split over several. Paths come from `nagare bench cluster`, which substitutes ${INPUT} and ${OUTPUT}.
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
  WATERMARK FOR time AS time - INTERVAL '30' SECOND
) WITH (connector = 'filesystem', path = '${INPUT}', format = 'json');

CREATE TABLE per_tenant WITH (connector = 'filesystem', path = '${OUTPUT}', format = 'parquet');

INSERT INTO per_tenant
SELECT detail.tenant_id AS tenant_id,
       TUMBLE_START(time, INTERVAL '1' MINUTE) AS minute,
       COUNT(*) AS events,
       SUM(detail.amount) AS amount
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1
GROUP BY detail.tenant_id, TUMBLE(time, INTERVAL '1' MINUTE);
