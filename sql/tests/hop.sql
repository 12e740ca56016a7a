-- Hopping windows: each row counts in size/slide windows. Re-deliveries are counted too (no dedup here), except
-- the ones whose windows have all closed (late).
SET parallelism = 1;
SET batch_size = 2;
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
SELECT HOP_START(time, INTERVAL '30' SECOND, INTERVAL '1' MINUTE) AS window_start,
       COUNT(*) AS n,
       SUM(detail.amount) AS total
FROM events
GROUP BY HOP(time, INTERVAL '30' SECOND, INTERVAL '1' MINUTE);
