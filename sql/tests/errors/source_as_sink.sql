-- error: connector 'generator' cannot be used as a sink
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out (id TEXT) WITH (connector = 'generator');
INSERT INTO out SELECT id FROM events;
