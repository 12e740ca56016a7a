-- error: 5:43: ROW_NUMBER must use an event-time column, and 'events.kind' is not one
SET dedup_ttl = '1m';
CREATE TABLE events (id TEXT, kind TEXT, time TIMESTAMP, WATERMARK FOR time AS time) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY kind) AS rn FROM events) WHERE rn = 1;
