-- error: 4:7: unknown option 'fromat' for connector 'filesystem' (hint: did you mean 'format'?
CREATE TABLE events (id TEXT, time TIMESTAMP)
WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl',
      fromat = 'json');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
