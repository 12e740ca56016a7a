//! Leader election among coordinators (etcd's election API): only the leader schedules; the others serve the API
//! and wait. A leader that cannot renew its lease stops scheduling before another can take over.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::scheduler::{self, Workers};
use crate::store::{EtcdStore, MetadataStore, StoreError};

/// Seconds a leader's lease lasts without renewal.
pub const LEASE_TTL: i64 = 5;

/// Campaigns, then schedules while leading. Returns when leadership is lost (the caller campaigns again) or when
/// `stop` is cancelled.
pub async fn lead(
    etcd: &EtcdStore,
    id: &str,
    workers: Arc<dyn Workers>,
    period: Duration,
    policy: scheduler::Policy,
    stop: CancellationToken,
) -> Result<(), StoreError> {
    let mut client = etcd.client();
    let lease = client.lease_grant(LEASE_TTL, None).await?.id();
    let (mut keeper, mut responses) = client.lease_keep_alive(lease).await?;
    let lost = CancellationToken::new();
    let renew = {
        let lost = lost.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let ok = keeper.keep_alive().await.is_ok()
                    && matches!(tokio::time::timeout(Duration::from_secs(2), responses.message()).await,
                        Ok(Ok(Some(r))) if r.ttl() > 0);
                if !ok {
                    lost.cancel();
                    return;
                }
            }
        })
    };
    let campaign = async {
        let mut election = client.election_client();
        election.campaign(etcd.key(crate::keys::LEADER), id, lease).await
    };
    let won = tokio::select! {
        r = campaign => Some(r?),
        _ = lost.cancelled() => None,
        _ = stop.cancelled() => None,
    };
    if won.is_some() {
        tracing::info!(coordinator = id, "leading: scheduling jobs");
        let store: Arc<dyn MetadataStore> = Arc::new(etcd.clone());
        let until = CancellationToken::new();
        let sched = tokio::spawn(scheduler::run(store, workers, period, policy, until.clone()));
        tokio::select! {
            _ = lost.cancelled() => tracing::warn!(coordinator = id, "lost the leader lease; scheduling stops"),
            _ = stop.cancelled() => {}
        }
        until.cancel();
        let _ = sched.await;
    }
    renew.abort();
    let _ = client.lease_revoke(lease).await;
    Ok(())
}
