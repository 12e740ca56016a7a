//! The coordinator of a nagare cluster. Jobs, their state and the live workers are kept in a [`MetadataStore`]
//! (etcd under `/nagare/`, or in memory for one process); every coordinator serves the `JobService` API from it,
//! and the one holding the etcd leadership schedules: it places jobs on workers with free slots, follows their
//! progress, and restarts a job from its last checkpoint on another worker when its worker's lease expires.

pub mod leader;
pub mod lease;
pub mod model;
pub mod scheduler;
pub mod service;
pub mod store;

pub use store::{EtcdStore, FileStore, MemoryStore, MetadataStore, StoreError};

/// Keys under which a cluster keeps its state, below the store's prefix (`/nagare` by default, so jobs are at
/// `/nagare/jobs/<id>`).
pub mod keys {
    /// Prefix of job records: `<prefix>/jobs/<id>`.
    pub const JOBS: &str = "/jobs/";
    /// Prefix of worker registrations (each bound to the worker's lease): `<prefix>/workers/<id>`.
    pub const WORKERS: &str = "/workers/";
    /// Prefix of what users asked of jobs (stop, rescale), queued for the scheduler: `<prefix>/requests/<job>/<seq>`.
    pub const REQUESTS: &str = "/requests/";
    /// The election coordinators campaign in.
    pub const LEADER: &str = "/leader";
}
