-- CSV input with a header, windowed per tenant.
SET parallelism = 1;
CREATE TABLE orders (
  order_id TEXT,
  tenant BIGINT,
  amount DOUBLE,
  placed_at TIMESTAMP,
  WATERMARK FOR placed_at AS placed_at
) WITH (connector = 'filesystem', path = '${DIR}/data/orders.csv', format = 'csv');
CREATE TABLE out WITH (connector = 'filesystem', path = '${OUT}/out', format = 'json');
INSERT INTO out
SELECT tenant, TUMBLE_START(placed_at, INTERVAL '1' MINUTE) AS minute, COUNT(*) AS orders, SUM(amount) AS amount
FROM orders
GROUP BY tenant, TUMBLE(placed_at, INTERVAL '1' MINUTE);
