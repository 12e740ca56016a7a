-- error: 3:32: table 'nope' not found
CREATE TABLE out WITH (connector = 'stdout');
INSERT INTO out SELECT id FROM nope;
