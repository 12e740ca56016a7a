-- error: 5:47: ROW_NUMBER() is only supported as the dedup idiom
SET dedup_ttl = '1m';
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id, rn FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events);
