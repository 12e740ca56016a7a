-- error: 2:31: column type GEOGRAPHY is not supported
CREATE TABLE events (id TEXT, g GEOGRAPHY) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
