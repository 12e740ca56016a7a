-- error: bad_records = 'dead_letter' needs a directory
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/bad-lines.jsonl', bad_records = 'dead_letter');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
