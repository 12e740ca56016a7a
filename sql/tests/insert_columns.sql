-- A sink with declared columns: INSERT with a column list, implicit widening casts, and NULL for the rest.
SET parallelism = 1;
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  kind TEXT,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE>,
  tags ARRAY<TEXT>,
  payload JSON,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out (
  id TEXT NOT NULL,
  tenant BIGINT,
  amount DOUBLE,
  note TEXT
) WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out (amount, id, tenant)
SELECT CAST(detail.amount AS REAL), id, CAST(detail.tenant_id AS INT) FROM events WHERE id IN ('a1', 'a9');
