//! Processes of a local cluster for end-to-end tests: `nagare` children with their logs in files, SIGKILLed when
//! dropped, on free loopback ports.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A child process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `nagare <args>` with the API token `token`, logging at info level to `<dir>/<name>.log`.
pub fn spawn(dir: &Path, name: &str, token: &str, args: &[&str]) -> Proc {
    spawn_env(dir, name, token, args, &[])
}

/// [`spawn`] with more environment variables.
pub fn spawn_env(dir: &Path, name: &str, token: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(env!("CARGO_BIN_EXE_nagare"))
        .args(args)
        .envs(envs.iter().copied())
        .env("NAGARE_LOG", "info")
        .env("NAGARE_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Proc { child, log }
}

/// A plaintext (`--insecure`) coordinator on a free port, keeping checkpoints under `<dir>/checkpoints`, with
/// `extra` arguments; returns its API address and the process.
pub fn insecure_coordinator(
    dir: &Path,
    etcd: &str,
    prefix: &str,
    token: &str,
    name: &str,
    extra: &[&str],
    envs: &[(&str, &str)],
) -> (String, Proc) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let ckpt = dir.join("checkpoints");
    let args =
        ["coordinator", "--etcd", etcd, "--etcd-prefix", prefix, "--listen", &listen, "--insecure", "--id", name]
            .iter()
            .copied()
            .chain(["--checkpoint-url", ckpt.to_str().unwrap(), "--token", token])
            .chain(extra.iter().copied())
            .collect::<Vec<_>>();
    (format!("http://127.0.0.1:{port}"), spawn_env(dir, name, token, &args, envs))
}

/// A plaintext (`--insecure`) worker `id` with two slots.
pub fn insecure_worker(dir: &Path, etcd: &str, prefix: &str, token: &str, id: &str, envs: &[(&str, &str)]) -> Proc {
    spawn_env(
        dir,
        id,
        token,
        &["worker", "--etcd", etcd, "--etcd-prefix", prefix, "--slots", "2", "--id", id, "--insecure"],
        envs,
    )
}
