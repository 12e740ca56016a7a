-- A gzip-compressed input (compression chosen by extension), matched by a glob.
SET parallelism = 1;
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '${DIR}/data/*.jsonl.gz');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out SELECT id, time FROM events WHERE id < 'a4';
