-- Dedup feeding a tumbling window with every supported aggregate.
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
SELECT detail.tenant_id AS tenant,
       TUMBLE_START(time, INTERVAL '1' MINUTE) AS window_start,
       TUMBLE_END(time, INTERVAL '1' MINUTE) AS window_end,
       COUNT(*) AS n,
       SUM(detail.amount) AS total,
       MIN(detail.amount) AS smallest,
       MAX(detail.amount) AS largest,
       AVG(detail.amount) AS mean,
       COUNT(DISTINCT kind) AS kinds
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1
GROUP BY detail.tenant_id, TUMBLE(time, INTERVAL '1' MINUTE);
