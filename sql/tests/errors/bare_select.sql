-- error: 3:1: a bare SELECT has nowhere to go
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
SELECT id FROM events;
