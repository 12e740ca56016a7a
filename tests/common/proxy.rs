//! A TCP proxy in front of a real service that can be told to fail: while failing it drops the connections it
//! holds and answers every new HTTP request with `503 Service Unavailable`, as a throttled or overloaded AWS
//! endpoint does. Tests point a connector's `endpoint` at it to prove retries lose nothing.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A running proxy (its threads end with the test process).
pub struct FaultProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    failing: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    refused: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Forwards to `target` (`host:port`).
    pub fn start(target: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let proxy = FaultProxy {
            url,
            failing: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
            refused: Arc::new(AtomicU64::new(0)),
        };
        let (failing, open, refused, target) =
            (proxy.failing.clone(), proxy.open.clone(), proxy.refused.clone(), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if failing.load(Ordering::SeqCst) {
                    refused.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || refuse(client));
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else { continue };
                if let (Ok(c), Ok(s)) = (client.try_clone(), server.try_clone()) {
                    open.lock().unwrap().extend([c, s]);
                }
                pipe(client, server);
            }
        });
        proxy
    }

    /// From now on every request fails (connections held now are cut), until [`FaultProxy::heal`].
    pub fn fail(&self) {
        self.failing.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Requests pass again.
    pub fn heal(&self) {
        self.failing.store(false, Ordering::SeqCst);
    }

    /// Connections answered with 503 so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }
}

/// Copies both ways until either side closes.
fn pipe(client: TcpStream, server: TcpStream) {
    let copy = |mut from: TcpStream, mut to: TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        })
    };
    if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
        copy(client, s2);
        copy(server, c2);
    }
}

/// Reads the request's head and answers 503 (SQS's JSON error shape), then closes.
fn refuse(mut client: TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = client.set_read_timeout(Some(std::time::Duration::from_secs(2)));
    let _ = client.read(&mut buf);
    let body = r#"{"__type":"ServiceUnavailable","message":"injected by the test proxy"}"#;
    let _ = write!(
        client,
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = client.shutdown(Shutdown::Both);
}
