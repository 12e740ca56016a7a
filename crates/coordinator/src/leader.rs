//! Leader election among coordinators (etcd's election API): only the leader schedules; the others serve the API
//! and wait in the election. A leader stops scheduling as soon as its lease may be gone — a renewal unanswered for
//! [`STEP_DOWN_AFTER`] — before etcd can expire it and let another coordinator lead; then it campaigns again.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::lease::{Backoff, Holding, LeaseEnd};
use crate::scheduler::{self, Workers};
use crate::store::{EtcdStore, MetadataStore, StoreError};

/// Seconds a leader's lease lasts without renewal.
pub const LEASE_TTL: i64 = 5;

/// A leader whose lease renewals have gone unanswered this long stops scheduling: the rest of [`LEASE_TTL`] is the
/// time its last scheduling pass has to end before another coordinator can lead.
pub const STEP_DOWN_AFTER: Duration = Duration::from_secs(3);

/// How one round of the election ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// `stop` was cancelled.
    Stopped,
    /// The lease is gone, or may be (after leading, or while waiting): campaign again.
    Lost(String),
}

/// What the leader runs, and how often.
#[derive(Clone)]
pub struct Scheduling {
    /// How the scheduler reaches workers.
    pub workers: Arc<dyn Workers>,
    /// Time between scheduling passes.
    pub period: Duration,
    /// How it schedules.
    pub policy: scheduler::Policy,
}

impl std::fmt::Debug for Scheduling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduling").field("period", &self.period).field("policy", &self.policy).finish()
    }
}

/// The coordinator's election loop until `stop`: campaigns, schedules while leading, and campaigns again when the
/// lease is lost. etcd being away is logged once as a warning and its return once; waiting behind another leader
/// is logged at debug level only.
pub async fn run(etcd: EtcdStore, id: String, scheduling: Scheduling, stop: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
    let mut failing = false;
    while !stop.is_cancelled() {
        let end = match grant(&etcd).await {
            Ok((lease, asked)) => {
                if std::mem::take(&mut failing) {
                    tracing::info!(coordinator = id, "etcd reachable again; campaigning");
                }
                backoff.reset();
                lead(&etcd, &id, lease, asked, &scheduling, &stop).await
            }
            Err(e) => Err(e),
        };
        let wait = match end {
            Ok(Round::Stopped) => return,
            Ok(Round::Lost(why)) => {
                tracing::info!(coordinator = id, "{why}; campaigning again");
                Duration::from_millis(200)
            }
            Err(e) => {
                if std::mem::replace(&mut failing, true) {
                    tracing::debug!(coordinator = id, error = %e, "etcd still unreachable; campaigning again");
                } else {
                    tracing::warn!(
                        coordinator = id,
                        error = %e,
                        "etcd unreachable: not leading; campaigning again when it answers"
                    );
                }
                backoff.next_wait()
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn grant(etcd: &EtcdStore) -> Result<(i64, tokio::time::Instant), StoreError> {
    let asked = tokio::time::Instant::now();
    Ok((etcd.client().lease_grant(LEASE_TTL, None).await?.id(), asked))
}

/// One round with a granted `lease`: campaigns (waiting behind the leader, if any), then schedules while the lease
/// holds. The lease is revoked on the way out, so that its election key goes with it.
async fn lead(
    etcd: &EtcdStore,
    id: &str,
    lease: i64,
    asked: tokio::time::Instant,
    scheduling: &Scheduling,
    stop: &CancellationToken,
) -> Result<Round, StoreError> {
    let done = CancellationToken::new();
    let holding = Holding { ttl: Duration::from_secs(LEASE_TTL as u64), give_up_after: STEP_DOWN_AFTER };
    let mut holder = {
        let (mut client, done, id) = (etcd.client(), done.clone(), id.to_string());
        tokio::spawn(async move {
            crate::lease::hold(
                &mut client,
                lease,
                holding,
                asked,
                &done,
                &id,
                "it keeps its place as leader or candidate",
            )
            .await
        })
    };
    let round = campaign_and_schedule(etcd, id, lease, scheduling, stop, &mut holder).await;
    done.cancel();
    holder.abort();
    // Best effort: should etcd be away, the lease expires by itself.
    let _ = tokio::time::timeout(Duration::from_secs(2), etcd.client().lease_revoke(lease)).await;
    round
}

async fn campaign_and_schedule(
    etcd: &EtcdStore,
    id: &str,
    lease: i64,
    scheduling: &Scheduling,
    stop: &CancellationToken,
    holder: &mut tokio::task::JoinHandle<LeaseEnd>,
) -> Result<Round, StoreError> {
    let lost = |end: Result<LeaseEnd, tokio::task::JoinError>| match end {
        Ok(LeaseEnd::Lost(why)) => Round::Lost(why),
        Ok(LeaseEnd::Stopped) => Round::Stopped,
        Err(e) => Round::Lost(format!("renewing the lease failed: {e}")),
    };
    // Campaigning waits as long as another coordinator leads: on the client without a request timeout (a dead
    // connection still fails it, by HTTP/2 keep-alive).
    let mut election = etcd.waiting_client().election_client();
    tracing::debug!(coordinator = id, "campaigning; waiting while another coordinator leads");
    tokio::select! {
        won = election.campaign(etcd.key(crate::keys::LEADER), id, lease) => { won?; }
        end = &mut *holder => return Ok(lost(end)),
        _ = stop.cancelled() => return Ok(Round::Stopped),
    }
    tracing::info!(coordinator = id, "leading: scheduling jobs");
    let store: Arc<dyn MetadataStore> = Arc::new(etcd.clone());
    let until = CancellationToken::new();
    let mut sched = tokio::spawn(scheduler::run(
        store,
        scheduling.workers.clone(),
        scheduling.period,
        scheduling.policy,
        until.clone(),
    ));
    let round = tokio::select! {
        end = &mut *holder => {
            let round = lost(end);
            if let Round::Lost(why) = &round {
                tracing::warn!(coordinator = id, "{why}; scheduling stops");
            }
            round
        }
        _ = stop.cancelled() => Round::Stopped,
    };
    until.cancel();
    // The pass under way ends (or is dropped) before the lease can expire at etcd.
    if tokio::time::timeout(Duration::from_secs(1), &mut sched).await.is_err() {
        sched.abort();
    }
    Ok(round)
}
