-- error: option 'csv_header': applies only to format = 'csv'
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl', csv_header = false);
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
