"""W1 as a DuckDB batch query: the reference figure quoted in the engine-core issue.

Run by `nagare bench w1 --duckdb` (needs `pip install duckdb==2.0.0`):
    python3 w1_duckdb.py INPUT.jsonl OUTPUT_DIR THREADS STATS.json
"""
import json
import os
import resource
import sys

import duckdb

inp, out, threads, stats = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
con = duckdb.connect()
con.execute(f"SET threads = {threads}")
columns = {
    "version": "VARCHAR", "id": "VARCHAR", "detail-type": "VARCHAR", "source": "VARCHAR", "account": "VARCHAR",
    "time": "TIMESTAMPTZ", "region": "VARCHAR", "resources": "VARCHAR[]",
    "detail": "STRUCT(tenant_id BIGINT, document_id VARCHAR, amount DOUBLE, currency VARCHAR, status VARCHAR)",
}
os.makedirs(out, exist_ok=True)
con.execute(f"""
COPY (
  SELECT id, "detail-type", time, detail.tenant_id AS tenant_id, detail.document_id AS document_id,
         detail.amount AS amount, detail.currency AS currency, detail.status AS status
  FROM read_json('{inp}', format = 'newline_delimited', columns = {columns})
  QUALIFY row_number() OVER (PARTITION BY id ORDER BY time) = 1
) TO '{out}/part.parquet' (FORMAT parquet, COMPRESSION snappy)
""")
with open(stats, "w") as f:
    json.dump({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}, f)
