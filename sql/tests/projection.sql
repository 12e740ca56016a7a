-- Row-wise SQL: nested fields, casts, scalar functions, arrays, JSON access, filters.
SET parallelism = 1;
CREATE TABLE events (
  id TEXT,
  time TIMESTAMP,
  kind TEXT,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE>,
  tags ARRAY<TEXT>,
  payload JSON,
  WATERMARK FOR time AS time - INTERVAL '5' SECOND
) WITH (connector = 'filesystem', path = '${DIR}/data/events.jsonl');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out
SELECT id,
       upper(kind) AS kind,
       detail.tenant_id AS tenant,
       detail.amount * 2 AS double_amount,
       CAST(detail.amount AS INT) AS whole,
       date_trunc('minute', time) AS minute,
       cardinality(tags) AS n_tags,
       tags[1] AS first_tag,
       json_get_str(payload, 'k') AS k,
       concat(id, '-', CAST(detail.tenant_id AS TEXT)) AS label
FROM events
WHERE detail.amount >= 4 AND kind <> 'Paid';
