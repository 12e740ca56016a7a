-- A window without keys (one subtask), with HAVING and a FILTER clause.
SET parallelism = 2;
SET batch_size = 4;
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  kind TEXT,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE>,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out
SELECT TUMBLE_START(time, INTERVAL '1' MINUTE) AS minute,
       COUNT(*) AS n,
       COUNT(*) FILTER (WHERE kind = 'Created') AS created
FROM events
GROUP BY TUMBLE(time, INTERVAL '1' MINUTE)
HAVING COUNT(*) > 1;
