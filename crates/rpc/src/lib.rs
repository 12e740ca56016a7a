//! The wire contracts of a nagare cluster, generated from `proto/nagare/v1`: `JobService` (the public API) and
//! `WorkerService` (coordinator to worker).

/// `nagare.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs, unused_qualifications)]
    tonic::include_proto!("nagare.v1");
}

/// The encoded descriptors of every service, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("nagare_descriptor");
