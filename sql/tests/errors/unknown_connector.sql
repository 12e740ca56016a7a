-- error: unknown connector 'kafak'
CREATE TABLE events (id TEXT) WITH (connector = 'kafak', topic = 'x');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
