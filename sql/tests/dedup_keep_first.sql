-- Re-deliveries (same id) are dropped, including ones that arrive behind the watermark; out-of-order input is
-- ordered by event time before the first row per id is chosen.
SET parallelism = 2;
SET batch_size = 2;
SET dedup_ttl = '10 minutes';
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  kind TEXT,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE>,
  tags ARRAY<TEXT>,
  payload JSON,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out
SELECT id, time, detail.amount AS amount
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1;
