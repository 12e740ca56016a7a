//! Generates the JobService and WorkerService code from `proto/nagare/v1` (with the system `protoc`, which
//! etcd-client's build needs as well), and a descriptor set for server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read at run time, not with env!(): the target directory is shared between clones (see .cargo/config.toml),
    // and cargo may reuse this script's binary built in another clone, which would then compile that clone's protos.
    let root = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [root.join("nagare/v1/jobs.proto"), root.join("nagare/v1/worker.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("nagare_descriptor.bin"))
        .compile_protos(&files, &[root])?;
    Ok(())
}
