-- EventBridge rule -> SQS -> nagare -> BigQuery, every event once (issue 13's seed pattern).
-- Run it against AWS and BigQuery:
--   nagare run sql/examples/eventbridge_to_bigquery.sql --checkpoint-dir s3://bucket/nagare/eb \
--     --var QUEUE_URL=https://sqs.ap-northeast-1.amazonaws.com/123456789012/analytics-events \
--     --var PROJECT=my-proj --var DATASET=raw --var TABLE=events
-- or on a laptop (moto + bqemulator): scripts/sqs-eventbridge-demo.sh
-- ${SQS_ENDPOINT}, ${BQ_GRPC}, ${BQ_REST} and ${BQ_CREDENTIALS} point at emulators; for AWS and BigQuery drop the
-- endpoint options and set credentials = 'default'.
SET checkpoint_interval = '2s';
-- Longer than the longest gap between two deliveries of one event: visibility timeout + a restart + retries.
SET dedup_ttl = '15 minutes';

CREATE TABLE events (
  id TEXT, "detail-type" TEXT, source TEXT, time TIMESTAMP,
  detail STRUCT<tenant_id BIGINT, amount DOUBLE, status TEXT>,
  _message_id TEXT, _receive_count INT,
  WATERMARK FOR time AS time - INTERVAL '2' SECOND
) WITH (connector = 'sqs', queue_url = '${QUEUE_URL}', endpoint = '${SQS_ENDPOINT}', envelope = 'eventbridge',
        visibility_timeout = '60s');

CREATE TABLE bq (id TEXT NOT NULL, detail_type TEXT, source TEXT, time TIMESTAMP, tenant_id BIGINT, amount DOUBLE,
  status TEXT, message_id TEXT, receive_count BIGINT)
WITH (connector = 'bigquery', project = '${PROJECT}', dataset = '${DATASET}', table = '${TABLE}',
      create_table = 'if_not_exists', partition_by = 'time', cluster_by = 'tenant_id',
      credentials = '${BQ_CREDENTIALS}', endpoint = '${BQ_GRPC}', rest_endpoint = '${BQ_REST}');

-- Dedup by EventBridge's event id: a re-delivered message (SQS is at least once) is dropped.
INSERT INTO bq
SELECT id, "detail-type", source, time, detail.tenant_id, detail.amount, detail.status, _message_id,
       CAST(_receive_count AS BIGINT)
FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY id ORDER BY time) AS rn FROM events) WHERE rn = 1;
