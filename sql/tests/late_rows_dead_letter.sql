-- dead_letters: 2
-- A watermark without delay makes two re-deliveries late for their (closed) windows: they are counted and written
-- to the dead-letter directory instead of the output.
SET parallelism = 1;
SET batch_size = 1;
SET late_rows = 'dead_letter';
SET dead_letter_path = '${OUT}/dead_letters';
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  WATERMARK FOR time AS time
) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out
SELECT TUMBLE_START(time, INTERVAL '1' MINUTE) AS minute, COUNT(*) AS n, array_agg(id) AS ids
FROM events
GROUP BY TUMBLE(time, INTERVAL '1' MINUTE);
