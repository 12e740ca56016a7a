-- error: 2:51: WATERMARK expression must be a TIMESTAMP, got TEXT
CREATE TABLE events (id TEXT, WATERMARK FOR id AS upper(id)) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
