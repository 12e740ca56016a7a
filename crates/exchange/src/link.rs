//! The link between part 0 of a job and each other part: part 0 says which checkpoint it restored, then relays
//! the checkpoint coordinator's control messages to the part's tasks, in order; the part relays its tasks'
//! reports, and says goodbye when its tasks have ended. A link that breaks without goodbye fails the job on both
//! sides, so a lost worker restarts the whole job from its last checkpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use arrow_flight::FlightData;
use bytes::Bytes;
use futures::FutureExt;
use nagare_core::CheckpointId;
use nagare_core::checkpoint::{TaskKey, TaskSnapshot};
use nagare_engine::EngineError;
use nagare_engine::checkpoint::{Control, Report};
use nagare_engine::distribute::{Follow, Lead};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tonic::{Status, Streaming};

use crate::error::ExchangeError;

/// Another part connecting to part 0.
pub struct LinkJoin {
    pub(crate) part: usize,
    pub(crate) incoming: Streaming<FlightData>,
    pub(crate) outgoing: mpsc::Sender<Result<FlightData, Status>>,
}

#[derive(Debug, Serialize, Deserialize)]
enum Down {
    Start { restored: Option<u64> },
    Control { task: TaskKey, complete: bool, id: u64, last: bool },
}

#[derive(Debug, Serialize, Deserialize)]
enum Up {
    Ack { id: u64, snapshot: TaskSnapshot },
    Declined { id: u64, task: TaskKey, reason: String },
    SourceFinished(TaskKey),
    Bye,
}

impl From<Report> for Up {
    fn from(r: Report) -> Self {
        match r {
            Report::Ack { id, snapshot } => Up::Ack { id: id.0, snapshot },
            Report::Declined { id, task, reason } => Up::Declined { id: id.0, task, reason },
            Report::SourceFinished(t) => Up::SourceFinished(t),
        }
    }
}

fn frame<T: Serialize>(message: &T) -> Result<FlightData, ExchangeError> {
    let json = serde_json::to_vec(message).map_err(|e| ExchangeError::Protocol(e.to_string()))?;
    Ok(FlightData::new().with_app_metadata(Bytes::from(json)))
}

fn parse<T: for<'de> Deserialize<'de>>(data: &FlightData) -> Result<T, ExchangeError> {
    serde_json::from_slice(&data.app_metadata).map_err(|e| ExchangeError::Protocol(format!("bad link message: {e}")))
}

/// Part 0: waits for the other parts, starts them, and returns their routes and the future serving them.
pub(crate) async fn lead(
    mut joins: UnboundedReceiver<LinkJoin>,
    parts: usize,
    restored: Option<u64>,
    reports: UnboundedSender<Report>,
    wait: Duration,
) -> Result<Lead, ExchangeError> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut joined: BTreeMap<usize, LinkJoin> = BTreeMap::new();
    while joined.len() + 1 < parts {
        match tokio::time::timeout_at(deadline, joins.recv()).await {
            Ok(Some(j)) if j.part > 0 && j.part < parts => {
                // A part that reconnects replaces its earlier, dropped attempt.
                joined.insert(j.part, j);
            }
            Ok(Some(j)) => return Err(ExchangeError::Protocol(format!("part {} joined a job of {parts}", j.part))),
            Ok(None) => return Err(ExchangeError::Peer("the exchange stopped".into())),
            Err(_) => {
                let missing: Vec<String> =
                    (1..parts).filter(|p| !joined.contains_key(p)).map(|p| p.to_string()).collect();
                return Err(ExchangeError::Peer(format!(
                    "part(s) {} of the job did not join within {} s",
                    missing.join(", "),
                    wait.as_secs()
                )));
            }
        }
    }
    let mut routes = vec![None; parts];
    let mut serving = Vec::new();
    for (part, j) in joined {
        j.outgoing
            .send(Ok(frame(&Down::Start { restored })?))
            .await
            .map_err(|_| ExchangeError::Peer(format!("part {part} left before it started")))?;
        let (tx, rx) = mpsc::unbounded_channel();
        routes[part] = Some(tx);
        serving.push(serve_part(j, rx, reports.clone()));
    }
    let run =
        async move { futures::future::try_join_all(serving).await.map(|_| ()).map_err(EngineError::from) }.boxed();
    Ok(Lead { routes, run })
}

async fn serve_part(
    join: LinkJoin,
    mut controls: UnboundedReceiver<(TaskKey, Control)>,
    reports: UnboundedSender<Report>,
) -> Result<(), ExchangeError> {
    let LinkJoin { part, mut incoming, outgoing } = join;
    let lost = |why: String| ExchangeError::Peer(format!("lost part {part} of the job: {why}"));
    let mut coordinating = true;
    loop {
        tokio::select! {
            control = controls.recv(), if coordinating => match control {
                Some((task, control)) => {
                    let (complete, id, last) = match control {
                        Control::Trigger { id, last } => (false, id.0, last),
                        Control::Complete { id, last } => (true, id.0, last),
                    };
                    outgoing
                        .send(Ok(frame(&Down::Control { task, complete, id, last })?))
                        .await
                        .map_err(|_| lost("its link closed".into()))?;
                }
                // The checkpoint coordinator has finished; wait for the part's goodbye.
                None => coordinating = false,
            },
            message = incoming.message() => {
                let report = match message {
                    Ok(Some(d)) => parse::<Up>(&d)?,
                    Ok(None) => return Err(lost("it ended without finishing".into())),
                    Err(s) => return Err(lost(s.message().to_string())),
                };
                let report = match report {
                    Up::Bye => return Ok(()),
                    Up::Ack { id, snapshot } => Report::Ack { id: CheckpointId(id), snapshot },
                    Up::Declined { id, task, reason } => Report::Declined { id: CheckpointId(id), task, reason },
                    Up::SourceFinished(t) => Report::SourceFinished(t),
                };
                // The coordinator may have finished already; late reports do not matter then.
                let _ = reports.send(report);
            }
        }
    }
}

/// Another part: reads part 0's start message and returns the relay to run once the tasks exist.
pub(crate) async fn follow(
    tx: mpsc::Sender<FlightData>,
    mut replies: Streaming<FlightData>,
) -> Result<Follow, ExchangeError> {
    let lost = || ExchangeError::Peer("lost part 0 of the job (it coordinates checkpoints)".into());
    let first = replies.message().await.map_err(|s| ExchangeError::Peer(s.message().to_string()))?.ok_or_else(lost)?;
    let Down::Start { restored } = parse::<Down>(&first)? else {
        return Err(ExchangeError::Protocol("the link did not start with the restored checkpoint".into()));
    };
    let run = move |controls: BTreeMap<TaskKey, UnboundedSender<Control>>, mut reports: UnboundedReceiver<Report>| {
        async move {
            loop {
                tokio::select! {
                    report = reports.recv() => match report {
                        Some(r) => tx.send(frame(&Up::from(r))?).await.map_err(|_| lost())?,
                        None => {
                            // Every task here has ended. Part 0 ends the link once it has read the goodbye;
                            // dropping it first could reset the stream before the goodbye arrives.
                            tx.send(frame(&Up::Bye)?).await.map_err(|_| lost())?;
                            drop(tx);
                            let closed = async { while let Ok(Some(_)) = replies.message().await {} };
                            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), closed).await;
                            return Ok(());
                        }
                    },
                    message = replies.message() => match message {
                        Ok(Some(d)) => {
                            if let Down::Control { task, complete, id, last } = parse::<Down>(&d)? {
                                let id = CheckpointId(id);
                                let control =
                                    if complete { Control::Complete { id, last } } else { Control::Trigger { id, last } };
                                if let Some(c) = controls.get(&task) {
                                    // A task that has ended no longer listens.
                                    let _ = c.send(control);
                                }
                            }
                        }
                        Ok(None) | Err(_) => return Err(lost()),
                    },
                }
            }
        }
        .map(|r: Result<(), ExchangeError>| r.map_err(EngineError::from))
        .boxed()
    };
    Ok(Follow { restored, run: Box::new(run) })
}
