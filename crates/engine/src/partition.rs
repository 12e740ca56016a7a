//! The output side of a task: routing each batch along the node's outgoing edges.

use std::sync::Arc;
use std::time::Instant;

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::record_batch::RecordBatch;
use datafusion::physical_expr::PhysicalExpr;
use nagare_core::Message;
use nagare_core::keys::{hash_columns, key_group_of, subtask_of_key_group};

use crate::channel::MessageSender;
use crate::error::Result;
use crate::metrics::NodeMetrics;

/// How one outgoing edge picks a downstream subtask.
pub enum Router {
    /// To the one target (forward to the same subtask index, or everything to subtask 0).
    One,
    /// By key hash through key groups.
    Hash {
        /// Key expressions over the batch.
        keys: Vec<Arc<dyn PhysicalExpr>>,
        /// Key groups of the job.
        max_parallelism: u32,
    },
    /// Whole batches in turn.
    RoundRobin {
        /// The next target.
        next: usize,
    },
}

/// One outgoing edge of a subtask: a router and a sender per reachable downstream subtask.
pub struct OutputEdge {
    /// How rows are routed.
    pub router: Router,
    /// Senders, indexed by downstream subtask (a single one for `Router::One`).
    pub targets: Vec<Box<dyn MessageSender>>,
}

/// All outgoing edges of a subtask.
pub struct Outputs {
    edges: Vec<OutputEdge>,
    metrics: Arc<NodeMetrics>,
}

impl Outputs {
    /// Outputs over `edges`, charging time blocked on full channels to `metrics`.
    pub fn new(edges: Vec<OutputEdge>, metrics: Arc<NodeMetrics>) -> Self {
        Outputs { edges, metrics }
    }

    /// Routes a batch along every edge.
    pub async fn send_batch(&mut self, batch: RecordBatch) -> Result<()> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let started = Instant::now();
        for edge in self.edges.iter_mut() {
            // Batches share their buffers: a clone per edge is cheap.
            let b = batch.clone();
            match &mut edge.router {
                Router::One => edge.targets[0].send(Message::Batch(b)).await?,
                Router::RoundRobin { next } => {
                    let t = *next % edge.targets.len();
                    *next = next.wrapping_add(1);
                    edge.targets[t].send(Message::Batch(b)).await?;
                }
                Router::Hash { keys, max_parallelism } => {
                    let parts = partition_by_hash(&b, keys, *max_parallelism, edge.targets.len())?;
                    for (t, part) in parts.into_iter().enumerate() {
                        if let Some(part) = part {
                            edge.targets[t].send(Message::Batch(part)).await?;
                        }
                    }
                }
            }
        }
        NodeMetrics::add(&self.metrics.backpressure_us, started.elapsed().as_micros() as usize);
        Ok(())
    }

    /// Sends a control message (watermark, barrier, end of stream) to every downstream subtask.
    pub async fn broadcast(&mut self, message: Message) -> Result<()> {
        for edge in &self.edges {
            for t in &edge.targets {
                t.send(message.clone()).await?;
            }
        }
        Ok(())
    }
}

/// Splits a batch into one part per downstream subtask (None where no row goes).
pub fn partition_by_hash(
    batch: &RecordBatch,
    keys: &[Arc<dyn PhysicalExpr>],
    max_parallelism: u32,
    parallelism: usize,
) -> Result<Vec<Option<RecordBatch>>> {
    let n = batch.num_rows();
    if parallelism == 1 {
        return Ok(vec![Some(batch.clone())]);
    }
    let cols = keys.iter().map(|k| k.evaluate(batch).and_then(|v| v.into_array(n))).collect::<Result<Vec<_>, _>>()?;
    let hashes = hash_columns(&cols, n)?;
    let mut indices: Vec<Vec<u32>> = vec![Vec::with_capacity(n / parallelism + 16); parallelism];
    for (row, h) in hashes.iter().enumerate() {
        let kg = key_group_of(*h, max_parallelism);
        let t = subtask_of_key_group(kg, max_parallelism, parallelism as u32) as usize;
        indices[t].push(row as u32);
    }
    let mut out = Vec::with_capacity(parallelism);
    for idx in indices {
        if idx.is_empty() {
            out.push(None);
        } else if idx.len() == n {
            out.push(Some(batch.clone()));
        } else {
            out.push(Some(take_record_batch(batch, &UInt32Array::from(idx))?));
        }
    }
    Ok(out)
}
