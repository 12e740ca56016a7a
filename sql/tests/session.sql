-- Session windows per tenant with a 30 second gap.
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
       SESSION_START(time, INTERVAL '30' SECOND) AS session_start,
       SESSION_END(time, INTERVAL '30' SECOND) AS session_end,
       COUNT(*) AS n,
       array_agg(id) AS ids
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events)
WHERE rn = 1
GROUP BY detail.tenant_id, SESSION(time, INTERVAL '30' SECOND);
