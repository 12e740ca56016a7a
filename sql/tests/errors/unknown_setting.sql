-- error: 2:1: unknown setting 'paralelism' (hint: did you mean 'parallelism'?
SET paralelism = 4;
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
