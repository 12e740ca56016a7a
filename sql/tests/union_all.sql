-- UNION ALL of two filtered branches of the same source.
SET parallelism = 2;
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
SELECT id, 'big' AS class FROM events WHERE detail.amount >= 10
UNION ALL
SELECT id, 'paid' AS class FROM events WHERE kind = 'Paid';
