//! Holding an etcd lease (a worker's registration, a coordinator's leadership). Renewals count from when they were
//! sent — etcd extends the lease when it receives one, later — so the holder learns on its own clock that its lease
//! is gone, or may be, before etcd can expire it and another process can take over what it held.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How holding a lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseEnd {
    /// Asked to stop; the lease may still be held (revoke it).
    Stopped,
    /// The lease is gone, or may be: why, in words.
    Lost(String),
}

/// How long a lease is held without an answer from etcd.
#[derive(Debug, Clone, Copy)]
pub struct Holding {
    /// The lease's TTL.
    pub ttl: Duration,
    /// Give the lease up when no renewal sent this long ago or since has been answered (at most `ttl`; less leaves
    /// the holder time to stop what the lease guards before etcd expires it).
    pub give_up_after: Duration,
}

/// Renews `lease` every sixth of `give_up_after` (so that an outage of etcd shorter than half of it goes by without
/// giving the lease up) until `stop`, or until it is gone or may be: etcd says it expired,
/// or no renewal sent in the last `give_up_after` was answered. `granted` is when the lease was asked for (its first
/// renewal). Renewals sent while etcd does not answer stay queued on the stream; a broken stream is opened again.
/// `holder` names the holder in logs; `meanwhile` says what goes on while etcd does not answer.
pub async fn hold(
    client: &mut etcd_client::Client,
    lease: i64,
    holding: Holding,
    granted: Instant,
    stop: &CancellationToken,
    holder: &str,
    meanwhile: &str,
) -> LeaseEnd {
    let limit = holding.give_up_after.min(holding.ttl);
    let period = (limit / 6).max(Duration::from_millis(100));
    let mut renewed = granted;
    let mut stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)> = None;
    // When each renewal still unanswered on the stream was sent, oldest first (answers come in order).
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut unreachable = false;
    let mut ticks = tokio::time::interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let expired = |how: &str| LeaseEnd::Lost(format!("the lease expired ({how})"));
    let unanswered = |unreachable: &mut bool, error: &dyn std::fmt::Display| {
        if !std::mem::replace(unreachable, true) {
            tracing::warn!(holder, error = %error, "etcd unreachable; {meanwhile} while the lease may still hold");
        }
    };
    let answered = |unreachable: &mut bool| {
        if std::mem::take(unreachable) {
            tracing::info!(holder, "etcd reachable again; the lease still held");
        }
    };
    loop {
        let deadline = renewed + limit;
        if Instant::now() >= deadline {
            return LeaseEnd::Lost(format!(
                "no renewal of the lease answered for {:.1} s, so it may have expired",
                limit.as_secs_f64()
            ));
        }
        let Some((keeper, responses)) = stream.as_mut() else {
            // Opening the stream sends a renewal and waits for its answer.
            let at = Instant::now();
            let opened = tokio::select! {
                _ = stop.cancelled() => return LeaseEnd::Stopped,
                opened = tokio::time::timeout_at(deadline, client.lease_keep_alive(lease)) => opened,
            };
            match opened {
                Ok(Ok(s)) => {
                    renewed = at;
                    sent.clear();
                    stream = Some(s);
                    answered(&mut unreachable);
                }
                // etcd-client's answer to a renewal of a lease etcd no longer has.
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(e))) => return expired(&e),
                Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::NotFound => {
                    return expired(s.message());
                }
                Ok(Err(e)) => {
                    unanswered(&mut unreachable, &e);
                    tokio::select! {
                        _ = stop.cancelled() => return LeaseEnd::Stopped,
                        _ = ticks.tick() => {}
                    }
                }
                // The deadline passed (checked at the top).
                Err(_) => {}
            }
            continue;
        };
        let mut broken: Option<String> = None;
        tokio::select! {
            _ = stop.cancelled() => return LeaseEnd::Stopped,
            _ = tokio::time::sleep_until(deadline) => {}
            _ = ticks.tick() => {
                let at = Instant::now();
                match keeper.keep_alive().await {
                    Ok(()) => sent.push_back(at),
                    Err(e) => broken = Some(e.to_string()),
                }
            }
            answer = responses.message() => match answer {
                Ok(Some(r)) if r.ttl() > 0 => {
                    if let Some(at) = sent.pop_front() {
                        renewed = renewed.max(at);
                    }
                    answered(&mut unreachable);
                }
                Ok(Some(_)) => return expired("etcd answered a renewal with TTL 0"),
                Ok(None) => broken = Some("the renewal stream ended".into()),
                Err(e) => broken = Some(e.to_string()),
            },
        }
        if let Some(why) = broken {
            unanswered(&mut unreachable, &why);
            stream = None;
        }
    }
}

/// Waits between attempts to reach etcd: from `first`, doubling up to `max`, each with up to a quarter more at
/// random, so that the processes of a cluster do not all ask etcd at once when it comes back.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starting at `first`, at most `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, next: first, max }
    }

    /// The next wait.
    pub fn next_wait(&mut self) -> Duration {
        use std::hash::{BuildHasher, Hasher};
        // A random number without a dependency: std's hasher keys differ per process and per call.
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let wait = self.next + self.next.mul_f64((random % 1000) as f64 / 4000.0);
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}
