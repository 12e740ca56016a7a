-- error: 2:63: variable '${NOPE}' is not set
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${NOPE}/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
