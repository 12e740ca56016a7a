-- error: 4:54: TUMBLE must use an event-time column, and 'events.time' is not one (hint: declare it on the source table
CREATE TABLE events (id TEXT, time TIMESTAMP) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT COUNT(*) FROM events GROUP BY TUMBLE(time, INTERVAL '1' MINUTE);
