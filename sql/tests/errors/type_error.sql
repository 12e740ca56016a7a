-- error: 4:24:
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT time + id FROM events;
