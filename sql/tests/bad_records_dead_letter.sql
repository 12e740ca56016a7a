-- dead_letters: 3
-- Malformed records (a bad timestamp, broken JSON, a string for a number) go to the dead-letter directory with
-- their reason; the good ones flow on.
SET parallelism = 1;
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE>
) WITH (connector = 'filesystem', path = '${DIR}/data/bad-lines.jsonl', bad_records = 'dead_letter',
        dead_letter_path = '${OUT}/dead_letters');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out SELECT id, time, detail.amount AS amount FROM events;
