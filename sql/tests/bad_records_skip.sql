-- bad_records = 'skip' drops malformed records (they are still counted).
SET parallelism = 1;
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (
  connector = 'filesystem', path = '${DIR}/data/bad-lines.jsonl', bad_records = 'skip');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out SELECT id FROM events;
