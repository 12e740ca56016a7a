-- Quickstart: EventBridge-shaped events from files, re-deliveries dropped, counted per tenant per minute.
--   nagare run sql/examples/quickstart.sql
-- Output: Parquet files under target/quickstart/ (one directory per sink).

SET dedup_ttl = '10 minutes';

CREATE TABLE events (
  id TEXT,
  "detail-type" TEXT,
  source TEXT,
  time TIMESTAMP,
  detail STRUCT<tenant_id BIGINT, document_id TEXT, amount DOUBLE, currency TEXT, status TEXT>,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (
  connector = 'filesystem',
  path = 'sql/examples/data/events.jsonl',
  format = 'json'
);

-- Every event once: re-deliveries (same id) are dropped.
CREATE TABLE unique_events WITH (connector = 'filesystem', path = 'target/quickstart/events', format = 'parquet');

-- Events and amounts per tenant per minute, from the deduplicated stream.
CREATE TABLE tenant_minutes WITH (connector = 'filesystem', path = 'target/quickstart/tenant_minutes', format = 'parquet');

INSERT INTO unique_events
SELECT id, "detail-type" AS detail_type, source, time, detail.tenant_id AS tenant_id, detail.amount AS amount
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1;

INSERT INTO tenant_minutes
SELECT detail.tenant_id AS tenant_id,
       TUMBLE_START(time, INTERVAL '1' MINUTE) AS minute,
       COUNT(*) AS events,
       SUM(detail.amount) AS amount,
       COUNT(DISTINCT "detail-type") AS detail_types
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1
GROUP BY detail.tenant_id, TUMBLE(time, INTERVAL '1' MINUTE);
