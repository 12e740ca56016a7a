-- error: 4:28: sink column 'amount' is DOUBLE but the query gives TEXT ('kind') (hint: cast it
CREATE TABLE events (id TEXT, kind TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out (id TEXT, amount DOUBLE) WITH (connector = 'stdout');
INSERT INTO out SELECT id, kind FROM events;
