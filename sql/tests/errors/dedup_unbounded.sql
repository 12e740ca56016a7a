-- error: dedup state would grow without bound (hint: bound it with SET dedup_ttl
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
