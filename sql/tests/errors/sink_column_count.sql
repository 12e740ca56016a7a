-- error: sink 'out' has 2 columns but the query gives 1
CREATE TABLE events (id TEXT, kind TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out (id TEXT, amount DOUBLE) WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
