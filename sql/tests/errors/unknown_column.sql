-- error: 4:24: No field named nope
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT nope FROM events;
