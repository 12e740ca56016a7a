-- error: 2:63: option 'path': '/nonexistent/nagare/*.json' matches no files
CREATE TABLE events (id TEXT) WITH (connector = 'filesystem', path = '/nonexistent/nagare/*.json');
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM events;
