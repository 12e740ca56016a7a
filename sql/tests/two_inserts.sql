-- Two INSERTs sharing one source (read once), each with its own sink.
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
CREATE TABLE ids WITH (connector = 'filesystem', path = '${OUT}/ids', format = 'json');
CREATE TABLE paid WITH (connector = 'filesystem', path = '${OUT}/paid', format = 'json');
INSERT INTO ids SELECT DISTINCT id, TUMBLE_START(time, INTERVAL '1' HOUR) AS hour FROM events;
INSERT INTO paid SELECT id, detail.amount AS amount FROM events WHERE kind = 'Paid';
