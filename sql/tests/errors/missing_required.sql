-- error: connector 'filesystem' needs option 'path'
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', format = 'json');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
