-- error: 4:43: joins are not supported yet
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT a.id FROM events a JOIN events b ON a.id = b.id;
