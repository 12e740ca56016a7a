-- error: 5:49: GROUP BY on an unbounded stream needs a window
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time)
WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id, COUNT(*) FROM events GROUP BY id;
