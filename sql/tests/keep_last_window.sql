-- Keep the last event per tenant within each minute (ORDER BY time DESC), emitted when the minute closes.
SET parallelism = 2;
SET batch_size = 3;
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
SELECT detail.tenant_id AS tenant, id, time
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY detail.tenant_id, TUMBLE(time, INTERVAL '1' MINUTE) ORDER BY time DESC) AS rn
      FROM events)
WHERE rn = 1;
