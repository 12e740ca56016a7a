//! Channels between subtasks and the input side of a task.
//!
//! Every (upstream subtask, downstream subtask) pair of an edge has its own bounded channel, so that a slow consumer
//! blocks its producers (backpressure) and so that a task can tell its inputs apart: watermarks are the minimum over
//! inputs, and barriers are aligned across inputs. The [`MessageSender`] trait is the seam a network edge implements.

use std::future::poll_fn;
use std::task::Poll;

use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use nagare_core::{Barrier, Message, Watermark};
use tokio::sync::mpsc;

use crate::error::{EngineError, Result};

/// Messages buffered per channel before the sender waits.
pub const CHANNEL_CAPACITY: usize = 4;

/// The sending end of a channel to one downstream subtask.
#[async_trait]
pub trait MessageSender: Send + Sync {
    /// Sends, waiting while the channel is full. Fails if the receiver is gone.
    async fn send(&self, message: Message) -> Result<()>;
}

/// The receiving end of a channel from one upstream subtask.
pub trait MessageReceiver: Send {
    /// Polls for the next message; `None` means the sender is gone.
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Message>>;
}

/// In-process channel sender.
#[derive(Debug, Clone)]
pub struct LocalSender(pub mpsc::Sender<Message>);

#[async_trait]
impl MessageSender for LocalSender {
    async fn send(&self, message: Message) -> Result<()> {
        self.0.send(message).await.map_err(|_| EngineError::Aborted)
    }
}

/// In-process channel receiver.
#[derive(Debug)]
pub struct LocalReceiver(pub mpsc::Receiver<Message>);

impl MessageReceiver for LocalReceiver {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Message>> {
        self.0.poll_recv(cx)
    }
}

/// A bounded in-process channel.
pub fn local_channel() -> (LocalSender, LocalReceiver) {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    (LocalSender(tx), LocalReceiver(rx))
}

/// What a task's inputs deliver, after watermark merging and barrier alignment.
#[derive(Debug)]
pub enum GateEvent {
    /// Rows from some input.
    Batch(RecordBatch),
    /// The minimum watermark over the inputs advanced to this (µs).
    Watermark(i64),
    /// Every input has delivered this barrier; with the time (µs) from the first input's barrier to alignment.
    Barrier(Barrier, u64),
    /// Every input has ended.
    End,
}

struct Input {
    rx: Box<dyn MessageReceiver>,
    finished: bool,
    blocked: bool,
    idle: bool,
    watermark: Option<i64>,
}

/// The merged inputs of a task.
///
/// Watermarks: the gate's watermark is the minimum over inputs that are neither finished nor idle, and it only
/// advances. Barriers: once an input delivers barrier *n* it is not read again until every other unfinished input has
/// delivered *n* too (alignment), so that the state snapshot contains exactly the rows before the barrier.
pub struct InputGate {
    inputs: Vec<Input>,
    next_start: usize,
    watermark: Option<i64>,
    pending_barrier: Option<(Barrier, std::time::Instant)>,
    /// The final checkpoint's barrier has passed: the job is stopping, and nothing may be emitted after it (its
    /// state is what a restart continues from), so watermarks no longer advance.
    stopped: bool,
}

impl InputGate {
    /// A gate over `receivers`, one per upstream subtask.
    pub fn new(receivers: Vec<Box<dyn MessageReceiver>>) -> Self {
        InputGate {
            inputs: receivers
                .into_iter()
                .map(|rx| Input { rx, finished: false, blocked: false, idle: false, watermark: None })
                .collect(),
            next_start: 0,
            watermark: None,
            pending_barrier: None,
            stopped: false,
        }
    }

    /// Number of inputs.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Whether the gate has no inputs.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// The next event. Cancel-safe: a message is taken from a channel only when the call completes with it.
    pub async fn next(&mut self) -> Result<GateEvent> {
        loop {
            if self.inputs.iter().all(|i| i.finished) {
                return Ok(GateEvent::End);
            }
            let (idx, msg) = poll_fn(|cx| {
                let n = self.inputs.len();
                for k in 0..n {
                    let i = (self.next_start + k) % n;
                    let input = &mut self.inputs[i];
                    if input.finished || input.blocked {
                        continue;
                    }
                    if let Poll::Ready(m) = input.rx.poll_recv(cx) {
                        self.next_start = (i + 1) % n;
                        return Poll::Ready((i, m));
                    }
                }
                Poll::Pending
            })
            .await;
            let Some(msg) = msg else {
                // The sender vanished without EndOfStream: its task failed.
                return Err(EngineError::Aborted);
            };
            if let Some(event) = self.handle(idx, msg) {
                return Ok(event);
            }
        }
    }

    fn handle(&mut self, idx: usize, msg: Message) -> Option<GateEvent> {
        match msg {
            Message::Batch(b) => {
                self.inputs[idx].idle = false;
                Some(GateEvent::Batch(b))
            }
            Message::Watermark(Watermark::EventTime(t)) => {
                let input = &mut self.inputs[idx];
                input.idle = false;
                input.watermark = Some(input.watermark.map_or(t, |w| w.max(t)));
                self.advance_watermark()
            }
            Message::Watermark(Watermark::Idle) => {
                self.inputs[idx].idle = true;
                self.advance_watermark()
            }
            Message::Barrier(b) => {
                self.inputs[idx].blocked = true;
                if self.pending_barrier.is_none() {
                    self.pending_barrier = Some((b, std::time::Instant::now()));
                }
                self.release_barrier()
            }
            Message::EndOfStream => {
                self.inputs[idx].finished = true;
                self.inputs[idx].blocked = false;
                if self.inputs.iter().all(|i| i.finished) {
                    return Some(GateEvent::End);
                }
                // A finished input no longer holds back barriers or watermarks.
                if let Some(e) = self.release_barrier() {
                    return Some(e);
                }
                self.advance_watermark()
            }
        }
    }

    fn release_barrier(&mut self) -> Option<GateEvent> {
        let (barrier, since) = self.pending_barrier?;
        if self.inputs.iter().all(|i| i.finished || i.blocked) {
            for i in &mut self.inputs {
                i.blocked = false;
            }
            self.pending_barrier = None;
            self.stopped |= barrier.then_stop;
            return Some(GateEvent::Barrier(barrier, since.elapsed().as_micros() as u64));
        }
        None
    }

    fn advance_watermark(&mut self) -> Option<GateEvent> {
        // (e.g. inputs that ended on their own, at watermark MAX, outliving inputs stopped at the final barrier)
        if self.stopped {
            return None;
        }
        let open = || self.inputs.iter().filter(|i| !i.finished);
        let min = if open().all(|i| i.idle) {
            // Every input is quiet: what they sent is all there is for now, so the furthest watermark holds for all
            // (otherwise rows of the input that saw the latest events would wait for the next event anywhere). A row
            // that comes later behind it is late: a dedup keeps it as a first occurrence, a window counts it.
            open().filter_map(|i| i.watermark).max()?
        } else {
            let mut min: Option<i64> = None;
            for i in open().filter(|i| !i.idle) {
                let w = i.watermark?;
                min = Some(min.map_or(w, |m| m.min(w)));
            }
            min?
        };
        if self.watermark.is_none_or(|w| min > w) {
            self.watermark = Some(min);
            return Some(GateEvent::Watermark(min));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use nagare_core::CheckpointId;

    use super::*;

    fn batch(v: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, false)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![v]))]).unwrap()
    }

    fn gate(n: usize) -> (Vec<LocalSender>, InputGate) {
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| local_channel()).unzip();
        (txs, InputGate::new(rxs.into_iter().map(|r| Box::new(r) as Box<dyn MessageReceiver>).collect()))
    }

    #[tokio::test]
    async fn watermark_is_min_over_inputs_and_ignores_finished_ones() {
        let (tx, mut g) = gate(2);
        tx[0].send(Message::Watermark(Watermark::EventTime(10))).await.unwrap();
        tx[1].send(Message::Watermark(Watermark::EventTime(5))).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(5)));
        tx[1].send(Message::Watermark(Watermark::EventTime(20))).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(10)));
        tx[0].send(Message::EndOfStream).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(20)));
        tx[1].send(Message::EndOfStream).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::End));
    }

    #[tokio::test]
    async fn idle_inputs_do_not_hold_back_the_watermark() {
        let (tx, mut g) = gate(2);
        tx[0].send(Message::Watermark(Watermark::EventTime(10))).await.unwrap();
        tx[1].send(Message::Watermark(Watermark::Idle)).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(10)));
    }

    #[tokio::test]
    async fn when_every_input_is_idle_the_furthest_watermark_holds() {
        let (tx, mut g) = gate(2);
        tx[0].send(Message::Watermark(Watermark::EventTime(10))).await.unwrap();
        tx[1].send(Message::Watermark(Watermark::EventTime(7))).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(7)));
        // Input 0 goes quiet first: input 1 still holds the watermark back.
        tx[0].send(Message::Watermark(Watermark::Idle)).await.unwrap();
        tx[1].send(Message::Watermark(Watermark::Idle)).await.unwrap();
        // Then both are quiet: input 0's rows up to 10 need not wait for input 1's next event.
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(10)));
    }

    #[tokio::test]
    async fn barrier_alignment_holds_back_an_input_until_all_delivered() {
        let (tx, mut g) = gate(2);
        let b = Barrier { checkpoint: CheckpointId(1), then_stop: false };
        tx[0].send(Message::Barrier(b)).await.unwrap();
        tx[0].send(Message::Batch(batch(1))).await.unwrap(); // after the barrier on input 0
        tx[1].send(Message::Batch(batch(2))).await.unwrap(); // before the barrier on input 1
        tx[1].send(Message::Barrier(b)).await.unwrap();
        let GateEvent::Batch(first) = g.next().await.unwrap() else { panic!("expected batch") };
        assert_eq!(first.column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0), 2);
        assert!(matches!(g.next().await.unwrap(), GateEvent::Barrier(x, _) if x == b));
        let GateEvent::Batch(after) = g.next().await.unwrap() else { panic!("expected batch") };
        assert_eq!(after.column(0).as_any().downcast_ref::<Int64Array>().unwrap().value(0), 1);
    }

    #[tokio::test]
    async fn watermarks_stop_at_the_final_barrier() {
        let (tx, mut g) = gate(2);
        // Input 1 ran out of input (watermark MAX, then waits for the final checkpoint); input 0 is stopped.
        tx[1].send(Message::Watermark(Watermark::MAX)).await.unwrap();
        tx[0].send(Message::Watermark(Watermark::EventTime(10))).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Watermark(10)));
        let b = Barrier { checkpoint: CheckpointId(3), then_stop: true };
        tx[0].send(Message::Barrier(b)).await.unwrap();
        tx[1].send(Message::Barrier(b)).await.unwrap();
        assert!(matches!(g.next().await.unwrap(), GateEvent::Barrier(..)));
        tx[0].send(Message::EndOfStream).await.unwrap();
        tx[1].send(Message::EndOfStream).await.unwrap();
        // Without the rule, input 0 ending would leave input 1's MAX as the watermark and flush every window.
        assert!(matches!(g.next().await.unwrap(), GateEvent::End));
    }

    #[tokio::test]
    async fn a_vanished_sender_is_an_error() {
        let (tx, mut g) = gate(1);
        drop(tx);
        assert!(g.next().await.is_err());
    }
}
