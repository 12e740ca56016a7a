#!/usr/bin/env bash
# EventBridge -> SQS -> nagare -> BigQuery on one machine: moto (EventBridge + SQS) and bqemulator stand in for AWS
# and BigQuery. Creates a queue and a rule on the default bus, puts EVENTS events,
# runs sql/examples/eventbridge_to_bigquery.sql until every event has landed, and prints the BigQuery row count.
#   EVENTS   events to put (default 200)
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS="${EVENTS:-200}"
export SVC_DIR="${SVC_DIR:-${TMPDIR:-/tmp}/nagare-services}"

eval "$(scripts/services/start-moto.sh | grep -E '^(AWS_|MOTO_PYTHON)' | sed 's/ .*//; s/^/export /')"
eval "$(scripts/services/start-bqemulator.sh | grep -E '^BIGQUERY_' | sed 's/ .*//; s/^/export /')"
PY="$MOTO_PYTHON"; AWS="scripts/services/moto-aws.py"
cargo build -q -p nagare-cli
# Wherever cargo puts it (the repo's .cargo/config.toml sets a shared target directory).
NAGARE="$(cargo metadata -q --no-deps --format-version 1 | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug/nagare"
[ -x "$NAGARE" ] || { echo "no nagare binary at $NAGARE" >&2; exit 1; }

RUN="demo$(date +%s)"
WORK="$(mktemp -d)"; trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
QUEUE="$("$PY" "$AWS" queue "$RUN")"
"$PY" "$AWS" route-eventbridge "$QUEUE" "$RUN" "demo.$RUN"
curl -sf -X POST "$BIGQUERY_REST_URL/bigquery/v2/projects/$BIGQUERY_PROJECT/datasets" \
  -H 'content-type: application/json' -d "{\"datasetReference\":{\"datasetId\":\"$RUN\"}}" >/dev/null

# Events (SQS may deliver one twice; the pipeline's dedup by event id drops the copy).
"$PY" - "$EVENTS" "demo.$RUN" > "$WORK/events.jsonl" <<'PYEOF'
import json, sys
n, source = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(json.dumps({"Source": source, "DetailType": "InvoicePaid",
                      "Detail": {"tenant_id": i % 13, "amount": round(i * 1.5, 2), "status": "paid"}}))
PYEOF
"$PY" "$AWS" put-events "$WORK/events.jsonl" >/dev/null
echo "put $EVENTS events on the bus; queue $QUEUE"

# bqemulator's FlushRows leaves a flush's last row invisible (real BigQuery does not): commit whole checkpoints
# with PENDING streams instead (commit = 'atomic') for the emulator.
sed "s/credentials = '\${BQ_CREDENTIALS}'/commit = 'atomic', credentials = '\${BQ_CREDENTIALS}'/" \
  sql/examples/eventbridge_to_bigquery.sql > "$WORK/pipeline.sql"
grep -q "commit = 'atomic'" "$WORK/pipeline.sql"
"$NAGARE" run "$WORK/pipeline.sql" -q --checkpoint-dir "$WORK/ckpt" \
  --var QUEUE_URL="$QUEUE" --var SQS_ENDPOINT="$AWS_ENDPOINT_URL" --var PROJECT="$BIGQUERY_PROJECT" \
  --var DATASET="$RUN" --var TABLE=events --var BQ_CREDENTIALS=none --var BQ_GRPC="$BIGQUERY_GRPC_ENDPOINT" \
  --var BQ_REST="$BIGQUERY_REST_URL" &
PID=$!

count() {
  curl -s -X POST "$BIGQUERY_REST_URL/bigquery/v2/projects/$BIGQUERY_PROJECT/queries" -H 'content-type: application/json' \
    -d "{\"query\":\"SELECT COUNT(*) FROM \`$BIGQUERY_PROJECT.$RUN.events\` WHERE detail_type = 'InvoicePaid'\",\"useLegacySql\":false}" \
    | "$PY" -c 'import json,sys; r=json.load(sys.stdin).get("rows"); print(r[0]["f"][0]["v"] if r else 0)'
}
# Rows wait in the dedup until the watermark passes them; a heartbeat event a minute ahead moves it on (a live
# bus has newer events all the time).
echo "{\"Source\":\"demo.$RUN\",\"DetailType\":\"Heartbeat\",\"Detail\":{},\"Time\":\"$(date -u -d '+1 minute' +%Y-%m-%dT%H:%M:%SZ)\"}" > "$WORK/heartbeat.jsonl"
for _ in $(seq 60); do
  "$PY" "$AWS" put-events "$WORK/heartbeat.jsonl" >/dev/null
  [ "$(count)" -ge "$EVENTS" ] && break
  sleep 1
done
kill -INT "$PID"; wait "$PID" || true
echo "BigQuery $BIGQUERY_PROJECT.$RUN.events: $(count) rows for $EVENTS events; queue (visible, in flight): $("$PY" "$AWS" counts "$QUEUE")"
