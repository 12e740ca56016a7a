//! A job spread over several processes ("parts", one per worker): which subtask runs where, and the seam the
//! network implements — channels between subtasks in different parts, and the link that carries checkpoint
//! control and reports between part 0 (which restores sinks and runs the checkpoint coordinator) and the others.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use futures::future::BoxFuture;
use nagare_core::checkpoint::TaskKey;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::channel::{MessageReceiver, MessageSender};
use crate::checkpoint::{Control, Report};
use crate::error::Result;

/// One channel of a job: an edge of the graph and the subtasks at its two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelKey {
    /// Edge index in the graph.
    pub edge: usize,
    /// Upstream subtask.
    pub from: usize,
    /// Downstream subtask.
    pub to: usize,
}

/// This process's share of a job that runs in several processes.
#[derive(Clone)]
pub struct Distribution {
    /// This part. Part 0 leads: it chooses the checkpoint to restore, recovers sinks and coordinates checkpoints.
    pub part: usize,
    /// The part of each slot; subtask `s` of every operator runs in slot `s`.
    pub slot_parts: Vec<usize>,
    /// Channels and the link to the other parts.
    pub network: Arc<dyn Network>,
}

impl fmt::Debug for Distribution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Distribution").field("part", &self.part).field("slot_parts", &self.slot_parts).finish()
    }
}

impl Distribution {
    /// The part that runs subtask `subtask` of any operator.
    pub fn part_of(&self, subtask: usize) -> usize {
        if self.slot_parts.is_empty() { 0 } else { self.slot_parts[subtask % self.slot_parts.len()] }
    }

    /// How many parts the job has.
    pub fn parts(&self) -> usize {
        self.slot_parts.iter().copied().max().map_or(1, |m| m + 1)
    }
}

/// Where part 0 sends a remote task's control messages: one ordered stream per part.
pub type ControlRoute = UnboundedSender<(TaskKey, Control)>;

/// Part 0's side of the link, once every other part has joined.
pub struct Lead {
    /// Per part (index = part; `None` for part 0): its control stream.
    pub routes: Vec<Option<ControlRoute>>,
    /// Runs until every other part has said goodbye; fails when one vanishes.
    pub run: BoxFuture<'static, Result<()>>,
}

/// Given a part's tasks' control channels and their reports, relays both until the tasks end.
pub type Relay = Box<
    dyn FnOnce(BTreeMap<TaskKey, UnboundedSender<Control>>, UnboundedReceiver<Report>) -> BoxFuture<'static, Result<()>>
        + Send,
>;

/// Another part's side of the link, once part 0 has said which checkpoint it restored.
pub struct Follow {
    /// The checkpoint part 0 restored (its sinks are already consistent with it).
    pub restored: Option<u64>,
    /// The relay to run once this part's tasks exist.
    pub run: Relay,
}

/// The network between the parts of one job attempt.
#[async_trait]
pub trait Network: Send + Sync {
    /// A sender on `channel` to the part running its downstream subtask.
    fn sender(&self, channel: ChannelKey, part: usize) -> Result<Box<dyn MessageSender>>;
    /// The receiving end of `channel` in this part.
    fn receiver(&self, channel: ChannelKey) -> Result<Box<dyn MessageReceiver>>;
    /// Part 0: waits until the other `parts - 1` parts have joined, tells them `restored`, and forwards their
    /// tasks' reports into `reports`.
    async fn lead(&self, parts: usize, restored: Option<u64>, reports: UnboundedSender<Report>) -> Result<Lead>;
    /// Part `part` > 0: joins part 0 and waits to learn which checkpoint it restored.
    async fn follow(&self, part: usize) -> Result<Follow>;
}
