-- error: 4:39: ORDER BY has no meaning on an unbounded stream
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events ORDER BY id;
