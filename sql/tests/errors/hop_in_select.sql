-- error: HOP() can only be used in GROUP BY
CREATE TABLE events (id TEXT, time TIMESTAMP, WATERMARK FOR time AS time) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id, HOP(time, INTERVAL '1' MINUTE, INTERVAL '2' MINUTE) AS w FROM events;
