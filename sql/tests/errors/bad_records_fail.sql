-- error: bad-lines.jsonl:3: whilst decoding field 'time': failed to parse "not a time"
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '${DIR}/data/bad-lines.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id, time FROM events;
