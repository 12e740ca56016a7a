-- error: option 'watch': expected true or false, got 'sometimes'
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl', watch = 'sometimes');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
