//! Tasks: one subtask of a chain of operators, driven either by a source or by its input channels.
//!
//! Operators connected by forward edges with equal parallelism run in one task (a chain), so rows pass between them
//! as plain function calls. A chain ends in a sink or in the outputs to other tasks. With checkpoints, a task also
//! listens to the coordinator: sources start checkpoints when told, every task snapshots its operators at an
//! aligned barrier and reports, and sinks commit when a checkpoint completes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow::array::Array;
use arrow::datatypes::{DataType, Int64Type, TimeUnit};
use arrow::record_batch::RecordBatch;
use datafusion::physical_expr::PhysicalExpr;
use nagare_core::checkpoint::{StateFile, TaskKey, TaskSnapshot};
use nagare_core::{Barrier, CheckpointId, Message, Watermark};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;

use crate::channel::{GateEvent, InputGate};
use crate::checkpoint::store::CheckpointStore;
use crate::checkpoint::{Control, Report};
use crate::connector::{Sink, Source, SourceEvent};
use crate::error::{EngineError, Result};
use crate::metrics::NodeMetrics;
use crate::operator::{Operator, PartKind, StatePart};
use crate::partition::Outputs;

/// Where a chain's output goes.
pub enum Terminal {
    /// To other tasks.
    Outputs(Outputs),
    /// Into a sink.
    Sink(Box<dyn Sink>, Arc<NodeMetrics>),
}

/// A task's link to the checkpoint coordinator.
pub struct CheckpointLink {
    /// This task (chain head, subtask).
    pub task: TaskKey,
    /// Messages from the coordinator.
    pub control: UnboundedReceiver<Control>,
    /// Reports to the coordinator.
    pub reports: UnboundedSender<Report>,
    uploads: UnboundedSender<Upload>,
    /// Set by the uploader when an upload failed: the next snapshot must not be a delta.
    force_full: Arc<AtomicBool>,
}

impl CheckpointLink {
    /// A link for `task`; starts its uploader (call inside the runtime).
    pub fn new(
        task: TaskKey,
        subtask: usize,
        store: CheckpointStore,
        control: UnboundedReceiver<Control>,
        reports: UnboundedSender<Report>,
    ) -> Self {
        let (uploads, queue) = tokio::sync::mpsc::unbounded_channel();
        let force_full = Arc::new(AtomicBool::new(false));
        let uploader = Uploader {
            task,
            subtask,
            store,
            reports: reports.clone(),
            force_full: force_full.clone(),
            chains: BTreeMap::new(),
            broken: false,
        };
        tokio::spawn(uploader.run(queue));
        CheckpointLink { task, control, reports, uploads, force_full }
    }
}

/// One checkpoint's state of a task, to be stored.
struct Upload {
    id: CheckpointId,
    parts: Vec<(usize, StatePart)>,
    source_position: Option<serde_json::Value>,
    sink_commit: Option<serde_json::Value>,
    alignment_us: u64,
}

/// Stores a task's snapshots one checkpoint after another, in the background, and keeps the chains of incremental
/// state: a delta's checkpoint refers to the base and every delta since. In order, so a delta is never stored before
/// the files its chain needs.
struct Uploader {
    task: TaskKey,
    subtask: usize,
    store: CheckpointStore,
    reports: UnboundedSender<Report>,
    force_full: Arc<AtomicBool>,
    /// Files of each (node, part) chain, as of the last stored snapshot.
    chains: BTreeMap<(usize, String), Vec<StateFile>>,
    /// An upload failed: deltas already taken cannot be stored until a snapshot with only full state arrives.
    broken: bool,
}

impl Uploader {
    async fn run(mut self, mut queue: UnboundedReceiver<Upload>) {
        while let Some(upload) = queue.recv().await {
            // Test hook: widens the window in which a crash hits a checkpoint whose state is being uploaded.
            if let Some(d) = nagare_core::faults::delay(nagare_core::faults::FaultPoint::Upload) {
                tokio::time::sleep(d).await;
            }
            let id = upload.id;
            match self.store_one(upload).await {
                Ok(snapshot) => {
                    let _ = self.reports.send(Report::Ack { id, snapshot });
                }
                Err(reason) => {
                    self.broken = true;
                    self.force_full.store(true, Ordering::Relaxed);
                    let _ = self.reports.send(Report::Declined { id, task: self.task, reason });
                }
            }
        }
    }

    async fn store_one(&mut self, upload: Upload) -> std::result::Result<TaskSnapshot, String> {
        let id = upload.id.0;
        let has_delta = upload.parts.iter().any(|(_, p)| p.kind == PartKind::Delta);
        if self.broken && has_delta {
            return Err("an earlier state upload failed, so this incremental snapshot has no base to extend; \
                        the next checkpoint stores full state"
                .into());
        }
        let mut files: BTreeMap<usize, Vec<StateFile>> = BTreeMap::new();
        let mut chains = Vec::new();
        for (node, part) in upload.parts {
            let path = match part.kind {
                PartKind::Whole => CheckpointStore::state_path(id, node, self.subtask, &part.name),
                PartKind::Base | PartKind::Delta => CheckpointStore::shared_path(id, node, self.subtask, &part.name),
            };
            let rows = part.batch.num_rows() as u64;
            let batch = part.batch;
            // Encoding is CPU work: off the runtime's worker threads.
            let encoded = tokio::task::spawn_blocking(move || CheckpointStore::encode(&batch))
                .await
                .map_err(|e| format!("encoding state: {e}"))?
                .map_err(|e| e.to_string())?;
            let bytes = encoded.len() as u64;
            self.store.put(&path, encoded).await.map_err(|e| e.to_string())?;
            let file = StateFile { path, part: part.name.clone(), bytes, rows, checkpoint: id };
            match part.kind {
                PartKind::Whole => files.entry(node).or_default().push(file),
                PartKind::Base => chains.push(((node, part.name), vec![file])),
                PartKind::Delta => {
                    let mut chain = self.chains.get(&(node, part.name.clone())).cloned().ok_or_else(|| {
                        format!(
                            "node {node} sent a delta of '{}' without a base (a bug): storing full state next",
                            part.name
                        )
                    })?;
                    chain.push(file);
                    chains.push(((node, part.name), chain));
                }
            }
        }
        for (key, chain) in chains {
            files.entry(key.0).or_default().extend(chain.iter().cloned());
            self.chains.insert(key, chain);
        }
        if !has_delta {
            self.broken = false;
        }
        Ok(TaskSnapshot {
            task: self.task,
            state: files,
            source_position: upload.source_position,
            sink_commit: upload.sink_commit,
            alignment_us: upload.alignment_us,
        })
    }
}

/// The operators of one subtask of a chain, and its terminal.
pub struct Chain {
    /// Operators in order, with their node's counters.
    pub ops: Vec<(Box<dyn Operator>, Arc<NodeMetrics>)>,
    /// Output.
    pub terminal: Terminal,
    /// Subtask index.
    pub subtask: usize,
}

impl Chain {
    /// Pushes batches through operators `from..`, returning what comes out of the last one.
    fn run_from(&mut self, from: usize, mut batches: Vec<RecordBatch>) -> Result<Vec<RecordBatch>> {
        for (op, metrics) in self.ops.iter_mut().skip(from) {
            if batches.is_empty() {
                break;
            }
            let mut out = Vec::with_capacity(batches.len());
            for b in batches {
                NodeMetrics::add(&metrics.rows_in, b.num_rows());
                op.process(b, &mut out)?;
            }
            NodeMetrics::add(&metrics.rows_out, out.iter().map(|b| b.num_rows()).sum());
            batches = out;
        }
        Ok(batches)
    }

    async fn emit(&mut self, batches: Vec<RecordBatch>) -> Result<()> {
        for b in batches {
            if b.num_rows() == 0 {
                continue;
            }
            match &mut self.terminal {
                Terminal::Outputs(o) => o.send_batch(b).await?,
                Terminal::Sink(sink, metrics) => {
                    let n = b.num_rows();
                    NodeMetrics::add(&metrics.rows_in, n);
                    sink.write(b).await?;
                    NodeMetrics::add(&metrics.rows_out, n);
                }
            }
        }
        Ok(())
    }

    /// Processes a batch and forwards the results.
    pub async fn push_batch(&mut self, batch: RecordBatch) -> Result<()> {
        let out = self.run_from(0, vec![batch])?;
        self.emit(out).await
    }

    /// Advances event time through every operator, in order, then downstream.
    pub async fn push_watermark(&mut self, watermark: i64) -> Result<()> {
        let mut results = Vec::new();
        for i in 0..self.ops.len() {
            let mut out = Vec::new();
            {
                let (op, metrics) = &mut self.ops[i];
                op.on_watermark(watermark, &mut out)?;
                NodeMetrics::add(&metrics.rows_out, out.iter().map(|b| b.num_rows()).sum());
                metrics.set_watermark(self.subtask, watermark);
            }
            results.extend(self.run_from(i + 1, out)?);
        }
        self.emit(results).await?;
        match &mut self.terminal {
            Terminal::Outputs(o) => o.broadcast(Message::Watermark(Watermark::EventTime(watermark))).await,
            Terminal::Sink(_, metrics) => {
                metrics.set_watermark(self.subtask, watermark);
                Ok(())
            }
        }
    }

    /// Tells downstream this subtask has no data for now.
    pub async fn push_idle(&mut self) -> Result<()> {
        match &mut self.terminal {
            Terminal::Outputs(o) => o.broadcast(Message::Watermark(Watermark::Idle)).await,
            Terminal::Sink(..) => Ok(()),
        }
    }

    /// An aligned barrier: snapshots every operator, pre-commits the sink or forwards the barrier, then uploads the
    /// state in the background and reports to the coordinator when it is stored.
    pub async fn push_barrier(
        &mut self,
        barrier: Barrier,
        alignment_us: u64,
        source_position: Option<serde_json::Value>,
        link: Option<&CheckpointLink>,
    ) -> Result<()> {
        let id = barrier.checkpoint;
        // What operators release at the barrier goes downstream ahead of it.
        let mut released = Vec::new();
        for i in 0..self.ops.len() {
            let mut out = Vec::new();
            {
                let (op, metrics) = &mut self.ops[i];
                op.on_barrier(&mut out)?;
                NodeMetrics::add(&metrics.rows_out, out.iter().map(|b| b.num_rows()).sum());
            }
            released.extend(self.run_from(i + 1, out)?);
        }
        self.emit(released).await?;
        // Snapshots are taken here (the operators' state as Arrow batches); encoding and upload run in the
        // background while the task goes on processing.
        let mut parts = Vec::new();
        if let Some(link) = link {
            let force_full = link.force_full.swap(false, Ordering::Relaxed);
            for (op, metrics) in &mut self.ops {
                for part in op.snapshot(force_full)? {
                    parts.push((metrics.node, part));
                }
            }
        }
        let sink_commit = match &mut self.terminal {
            Terminal::Outputs(o) => {
                o.broadcast(Message::Barrier(barrier)).await?;
                None
            }
            Terminal::Sink(sink, _) => Some(sink.pre_commit(id, barrier.then_stop).await?),
        };
        let Some(link) = link else { return Ok(()) };
        link.uploads
            .send(Upload { id, parts, source_position, sink_commit, alignment_us })
            .map_err(|_| EngineError::Internal("the state uploader has stopped".into()))?;
        Ok(())
    }

    /// Checkpoint `id` is complete: the sink makes its pre-committed writes visible.
    pub async fn commit(&mut self, id: CheckpointId) -> Result<()> {
        match &mut self.terminal {
            Terminal::Sink(sink, _) => sink.commit(id).await,
            Terminal::Outputs(_) => Ok(()),
        }
    }

    /// Periodic work of the terminal (a sink rolling files).
    pub async fn tick(&mut self) -> Result<()> {
        match &mut self.terminal {
            Terminal::Sink(sink, _) => sink.tick().await,
            Terminal::Outputs(_) => Ok(()),
        }
    }

    /// End of input: lets operators flush, then ends the stream downstream (or closes the sink).
    pub async fn finish(&mut self) -> Result<()> {
        let mut results = Vec::new();
        for i in 0..self.ops.len() {
            let mut out = Vec::new();
            self.ops[i].0.on_end(&mut out)?;
            results.extend(self.run_from(i + 1, out)?);
        }
        self.emit(results).await?;
        match &mut self.terminal {
            Terminal::Outputs(o) => o.broadcast(Message::EndOfStream).await,
            Terminal::Sink(sink, _) => sink.finish().await,
        }
    }

    fn has_sink(&self) -> bool {
        matches!(self.terminal, Terminal::Sink(..))
    }
}

/// How a source derives watermarks from its batches.
///
/// The watermark expression is evaluated on the row with the latest event time only: watermark expressions are
/// non-decreasing in the event time (`time - INTERVAL ...`), so that row gives the maximum.
///
/// A source that has received nothing for as long as the watermark's delay has seen every event up to its latest
/// one (stragglers had the delay's time to come): its watermark then moves to that latest event time, so that rows
/// waiting on it (a dedup choosing the first copy, windows) go out on a quiet input instead of waiting for the
/// next event. It never passes an event time the source has seen, so state kept by event time (a dedup's
/// `dedup_ttl`) is not cut short.
pub struct WatermarkGenerator {
    column: usize,
    expr: Arc<dyn PhysicalExpr>,
    current: Option<i64>,
    /// The latest event time seen (µs) and the watermark's delay behind it.
    latest: Option<(i64, Duration)>,
}

impl WatermarkGenerator {
    /// A generator for `expr` over event-time column `column`.
    pub fn new(column: usize, expr: Arc<dyn PhysicalExpr>) -> Self {
        WatermarkGenerator { column, expr, current: None, latest: None }
    }

    /// The new watermark after `batch`, if it advanced.
    pub fn observe(&mut self, batch: &RecordBatch) -> Result<Option<i64>> {
        let times = arrow::compute::cast(batch.column(self.column), &DataType::Int64)?;
        let times = times
            .as_any()
            .downcast_ref::<arrow::array::PrimitiveArray<Int64Type>>()
            .ok_or_else(|| EngineError::Internal("event-time cast".into()))?;
        let Some((row, latest)) =
            times.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v))).max_by_key(|(_, v)| *v)
        else {
            return Ok(None);
        };
        let one = batch.slice(row, 1);
        let values = self.expr.evaluate(&one)?.into_array(1)?;
        let DataType::Timestamp(unit, _) = values.data_type() else {
            return Err(EngineError::Internal(format!("watermark expression gives {}", values.data_type())));
        };
        let unit: TimeUnit = *unit;
        let raw = arrow::compute::cast(&values, &DataType::Int64)?;
        let raw = raw.as_any().downcast_ref::<arrow::array::PrimitiveArray<Int64Type>>();
        let Some(w) = raw.filter(|a| a.is_valid(0)).map(|a| nagare_core::keys::to_micros(a.value(0), unit)) else {
            return Ok(None);
        };
        if let DataType::Timestamp(time_unit, _) = batch.schema().field(self.column).data_type() {
            let latest = nagare_core::keys::to_micros(latest, *time_unit);
            if self.latest.is_none_or(|(l, _)| latest > l) {
                let delay = Duration::from_micros(latest.saturating_sub(w).max(0).unsigned_abs());
                self.latest = Some((latest, delay));
            }
        }
        if self.current.is_none_or(|c| w > c) {
            self.current = Some(w);
            return Ok(Some(w));
        }
        Ok(None)
    }

    /// The watermark of a source idle for `idle_for`: its latest event time once the delay has passed, if that is
    /// ahead of the watermark.
    pub fn release_idle(&mut self, idle_for: Duration) -> Option<i64> {
        let (latest, delay) = self.latest?;
        if idle_for < delay || self.current.is_some_and(|c| c >= latest) {
            return None;
        }
        self.current = Some(latest);
        Some(latest)
    }
}

/// What drives a source task besides its source.
pub struct SourceDriver {
    /// Watermarks, when the table declares them.
    pub watermarks: Option<WatermarkGenerator>,
    /// The node's counters.
    pub metrics: Arc<NodeMetrics>,
    /// Set to stop cleanly.
    pub stop: CancellationToken,
    /// How long without input before the subtask stops holding back the watermark.
    pub idle_timeout: Duration,
    /// Paces this subtask to its share of `source_rate_limit`.
    pub throttle: Option<Throttle>,
    /// The coordinator, when the job takes checkpoints.
    pub checkpoints: Option<CheckpointLink>,
}

/// Keeps a source subtask at or under a rate: rows are read in batches, and the next read waits until the rows so
/// far are due.
#[derive(Debug)]
pub struct Throttle {
    rows_per_second: f64,
    started: Option<Instant>,
    rows: u64,
}

impl Throttle {
    /// A throttle to `rows_per_second` (more than zero).
    pub fn new(rows_per_second: f64) -> Self {
        Throttle { rows_per_second: rows_per_second.max(f64::MIN_POSITIVE), started: None, rows: 0 }
    }

    /// Counts rows read.
    pub fn read(&mut self, rows: usize) {
        self.started.get_or_insert_with(Instant::now);
        self.rows += rows as u64;
    }

    /// How long until the rows read so far are due (zero: read on).
    pub fn ahead(&self, now: Instant) -> Duration {
        let Some(started) = self.started else { return Duration::ZERO };
        let due = started + Duration::from_secs_f64(self.rows as f64 / self.rows_per_second);
        due.saturating_duration_since(now)
    }
}

/// What a source task does with a message from the coordinator; true when the task should end.
async fn source_control(
    control: Control,
    source: &mut Box<dyn Source>,
    chain: &mut Chain,
    link: &CheckpointLink,
) -> Result<bool> {
    match control {
        Control::Trigger { id, last } => {
            let position = source.snapshot_position(id)?;
            chain.push_barrier(Barrier { checkpoint: id, then_stop: last }, 0, Some(position), Some(link)).await?;
            Ok(false)
        }
        Control::Complete { id, last } => {
            source.notify_checkpoint_complete(id, last).await?;
            chain.commit(id).await?;
            if last {
                chain.finish().await?;
                return Ok(true);
            }
            Ok(false)
        }
    }
}

/// Runs a source subtask and its chain until the input ends or the job stops (with checkpoints: until the final
/// checkpoint has completed).
pub async fn run_source_task(mut source: Box<dyn Source>, mut driver: SourceDriver, mut chain: Chain) -> Result<()> {
    let mut idle_since: Option<Instant> = None;
    let mut announced_idle = false;
    let mut last_tick = Instant::now();
    let mut exhausted = false;
    loop {
        if let Some(link) = driver.checkpoints.as_mut() {
            // Coordinator messages are taken between reads, so a barrier never splits a batch.
            while let Ok(control) = link.control.try_recv() {
                if source_control(control, &mut source, &mut chain, link).await? {
                    return Ok(());
                }
            }
            if exhausted {
                // Input is done: wait for the final checkpoint.
                match link.control.recv().await {
                    Some(control) => {
                        if source_control(control, &mut source, &mut chain, link).await? {
                            return Ok(());
                        }
                        continue;
                    }
                    None => return Err(EngineError::Aborted),
                }
            }
        }
        // Time-based sink work between reads; a read is never abandoned for it.
        if chain.has_sink() && last_tick.elapsed() >= Duration::from_secs(1) {
            chain.tick().await?;
            last_tick = Instant::now();
        }
        if let Some(wait) = driver.throttle.as_ref().map(|t| t.ahead(Instant::now())).filter(|w| !w.is_zero()) {
            // Ahead of the rate: wait in short steps, so coordinator messages and a stop are still taken promptly.
            tokio::select! {
                _ = driver.stop.cancelled() => {}
                _ = tokio::time::sleep(wait.min(Duration::from_millis(50))) => continue,
            }
        }
        let event = tokio::select! {
            biased;
            _ = driver.stop.cancelled() => None,
            event = source.next() => Some(event?),
        };
        let Some(event) = event else {
            // A clean stop: no final watermark, so windows still open are not emitted (they stay in the state).
            if let Some(link) = &driver.checkpoints {
                let _ = link.reports.send(Report::SourceFinished(link.task));
                exhausted = true;
                continue;
            }
            return chain.finish().await;
        };
        match event {
            SourceEvent::Batch(batch) => {
                idle_since = None;
                announced_idle = false;
                NodeMetrics::add(&driver.metrics.rows_out, batch.num_rows());
                if let Some(t) = driver.throttle.as_mut() {
                    t.read(batch.num_rows());
                }
                let wm = match driver.watermarks.as_mut() {
                    Some(g) => g.observe(&batch)?,
                    None => None,
                };
                chain.push_batch(batch).await?;
                if let Some(w) = wm {
                    driver.metrics.set_watermark(chain.subtask, w);
                    chain.push_watermark(w).await?;
                }
            }
            SourceEvent::Idle(wait) => {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if let Some(w) = driver.watermarks.as_mut().and_then(|g| g.release_idle(since.elapsed())) {
                    driver.metrics.set_watermark(chain.subtask, w);
                    chain.push_watermark(w).await?;
                    // The watermark made the input active again downstream: announce the idleness anew.
                    announced_idle = false;
                }
                if !announced_idle && since.elapsed() >= driver.idle_timeout {
                    chain.push_idle().await?;
                    announced_idle = true;
                }
                tokio::select! {
                    _ = driver.stop.cancelled() => {}
                    _ = tokio::time::sleep(wait.min(Duration::from_millis(200))) => {}
                }
            }
            SourceEvent::Pending => {}
            SourceEvent::End => {
                driver.metrics.set_watermark(chain.subtask, i64::MAX);
                chain.push_watermark(i64::MAX).await?;
                if let Some(link) = &driver.checkpoints {
                    let _ = link.reports.send(Report::SourceFinished(link.task));
                    exhausted = true;
                    continue;
                }
                return chain.finish().await;
            }
        }
    }
}

/// Runs an operator subtask (and its chain) until every input has ended.
pub async fn run_operator_task(mut gate: InputGate, mut chain: Chain, mut link: Option<CheckpointLink>) -> Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks = chain.has_sink();
    loop {
        let event = tokio::select! {
            // Coordinator messages first: a completed checkpoint's commit is queued before the next checkpoint's
            // barrier can arrive, so a sink always commits checkpoint n before it pre-commits n + 1.
            biased;
            control = recv_control(&mut link) => {
                if let Control::Complete { id, .. } = control {
                    chain.commit(id).await?;
                }
                continue;
            }
            _ = ticker.tick(), if ticks => {
                chain.tick().await?;
                continue;
            }
            event = gate.next() => event?,
        };
        match event {
            GateEvent::Batch(b) => chain.push_batch(b).await?,
            GateEvent::Watermark(w) => chain.push_watermark(w).await?,
            GateEvent::Barrier(b, alignment_us) => chain.push_barrier(b, alignment_us, None, link.as_ref()).await?,
            GateEvent::End => {
                // Commits queued before the end of the stream (the final checkpoint's) come first.
                if let Some(l) = link.as_mut() {
                    while let Ok(control) = l.control.try_recv() {
                        if let Control::Complete { id, .. } = control {
                            chain.commit(id).await?;
                        }
                    }
                }
                return chain.finish().await;
            }
        }
    }
}

/// The next coordinator message, or never when the job takes no checkpoints.
async fn recv_control(link: &mut Option<CheckpointLink>) -> Control {
    match link {
        Some(l) => match l.control.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use arrow::array::Int64Array;
    use arrow::datatypes::{Field, Schema};

    use super::*;

    fn part(kind: PartKind) -> StatePart {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        StatePart::chained(
            "groups",
            RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![1]))]).unwrap(),
            kind,
        )
    }

    /// Sends one checkpoint's part to the uploader and returns the files it acknowledged, or why it declined.
    async fn upload(
        link: &CheckpointLink,
        reports: &mut UnboundedReceiver<Report>,
        id: u64,
        kind: PartKind,
    ) -> std::result::Result<Vec<String>, String> {
        let parts = vec![(1, part(kind))];
        let up = Upload { id: CheckpointId(id), parts, source_position: None, sink_commit: None, alignment_us: 0 };
        link.uploads.send(up).unwrap();
        match reports.recv().await.unwrap() {
            Report::Ack { snapshot, .. } => Ok(snapshot.state[&1].iter().map(|f| f.path.clone()).collect()),
            Report::Declined { reason, .. } => Err(reason),
            Report::SourceFinished(_) => unreachable!(),
        }
    }

    #[tokio::test]
    async fn a_failed_upload_breaks_the_chain_until_a_new_base() {
        let dir = std::env::temp_dir().join(format!("nagare-uploader-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = CheckpointStore::open(&dir.to_string_lossy()).unwrap();
        let (reports_tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        let (_control_tx, control) = tokio::sync::mpsc::unbounded_channel();
        let link = CheckpointLink::new(TaskKey { node: 1, subtask: 0 }, 0, store, control, reports_tx);
        let path = |id: u64| CheckpointStore::shared_path(id, 1, 0, "groups");

        assert_eq!(upload(&link, &mut reports, 1, PartKind::Base).await, Ok(vec![path(1)]));
        assert_eq!(upload(&link, &mut reports, 2, PartKind::Delta).await, Ok(vec![path(1), path(2)]));
        // Checkpoint 3's file cannot be written (a directory is in its way).
        std::fs::create_dir_all(dir.join(path(3))).unwrap();
        let failed = upload(&link, &mut reports, 3, PartKind::Delta).await;
        assert!(failed.is_err(), "{failed:?}");
        assert!(link.force_full.load(Ordering::Relaxed), "the next snapshot must be full");
        // A delta taken before the operator heard of it has no chain to extend.
        let broken = upload(&link, &mut reports, 4, PartKind::Delta).await.unwrap_err();
        assert!(broken.contains("earlier state upload failed"), "{broken}");
        // A new base mends it; deltas extend the new chain, not the old one.
        assert_eq!(upload(&link, &mut reports, 5, PartKind::Base).await, Ok(vec![path(5)]));
        assert_eq!(upload(&link, &mut reports, 6, PartKind::Delta).await, Ok(vec![path(5), path(6)]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_throttle_holds_reads_until_the_rows_so_far_are_due() {
        let mut t = Throttle::new(1000.0);
        let now = Instant::now();
        assert_eq!(t.ahead(now), Duration::ZERO, "the first read is never held");
        t.read(500);
        let started = t.started.unwrap();
        assert_eq!(t.ahead(started), Duration::from_millis(500));
        assert_eq!(t.ahead(started + Duration::from_millis(200)), Duration::from_millis(300));
        assert_eq!(t.ahead(started + Duration::from_secs(1)), Duration::ZERO, "behind the rate: read on");
        t.read(1500);
        assert_eq!(t.ahead(started + Duration::from_secs(1)), Duration::from_secs(1));
    }

    #[test]
    fn an_idle_source_releases_its_latest_event_time_once_the_delay_has_passed() {
        use arrow::array::TimestampMicrosecondArray;
        use arrow::datatypes::{IntervalMonthDayNano, TimeUnit};
        use datafusion::logical_expr::Operator;
        use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
        use datafusion::scalar::ScalarValue;

        let schema =
            Arc::new(Schema::new(vec![Field::new("time", DataType::Timestamp(TimeUnit::Microsecond, None), true)]));
        let ten_seconds = ScalarValue::IntervalMonthDayNano(Some(IntervalMonthDayNano::new(0, 0, 10_000_000_000)));
        let expr = Arc::new(BinaryExpr::new(
            Arc::new(Column::new("time", 0)),
            Operator::Minus,
            Arc::new(Literal::new(ten_seconds)),
        ));
        let mut g = WatermarkGenerator::new(0, expr);
        assert_eq!(g.release_idle(Duration::from_secs(60)), None, "nothing seen, nothing to release");
        let batch = |t: Vec<i64>| {
            RecordBatch::try_new(schema.clone(), vec![Arc::new(TimestampMicrosecondArray::from(t))]).unwrap()
        };
        let s = 1_000_000;
        assert_eq!(g.observe(&batch(vec![30 * s, 50 * s, 40 * s])).unwrap(), Some(40 * s));
        // Idle for less than the delay: stragglers may still come.
        assert_eq!(g.release_idle(Duration::from_secs(9)), None);
        // Idle for the delay: everything up to the latest event is final, and no further.
        assert_eq!(g.release_idle(Duration::from_secs(10)), Some(50 * s));
        assert_eq!(g.release_idle(Duration::from_secs(20)), None, "released once");
        // An older event does not move it back; a newer one moves it on by its own delay.
        assert_eq!(g.observe(&batch(vec![45 * s])).unwrap(), None);
        assert_eq!(g.observe(&batch(vec![70 * s])).unwrap(), Some(60 * s));
        assert_eq!(g.release_idle(Duration::from_secs(10)), Some(70 * s));
    }
}
