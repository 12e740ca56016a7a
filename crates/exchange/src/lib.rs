//! Data and control between the workers that run parts of one job, over Arrow Flight `DoExchange`.
//!
//! Every channel whose two subtasks run on different workers is one `DoExchange` stream, opened by the sending
//! worker: batches go as Arrow IPC, watermarks, barriers and end-of-stream in-band as app metadata, so barrier
//! alignment and watermark merging work exactly as in memory. Flow control is credit-based: the receiver grants
//! as many messages as its queue holds and one more for each message its task takes, so a slow task stops its
//! remote producers just as a full in-memory channel does. Part 0 of a job and each other part share one more
//! stream, the link, which carries checkpoint control down and task reports up.

pub mod codec;
pub mod error;
mod link;

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use std::time::Duration;

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse,
    PollInfo, PutResult, SchemaResult, Ticket,
};
use async_trait::async_trait;
use futures::Stream;
use nagare_core::Message;
use nagare_engine::channel::{CHANNEL_CAPACITY, MessageReceiver, MessageSender};
use nagare_engine::distribute::{ChannelKey, Follow, Lead, Network};
use nagare_engine::{EngineError, checkpoint::Report};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::{Notify, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::codec::{Decoder, Encoder, credit, read_credit};
use crate::error::ExchangeError;

pub use link::LinkJoin;

/// Largest Flight message either side accepts (a batch is one message).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// HTTP/2 flow-control windows for exchange connections (per stream, per connection): wide enough that a batch
/// or two is in flight without waiting for window updates; credits, not these, bound what is buffered.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// See [`STREAM_WINDOW`].
pub const CONNECTION_WINDOW: u32 = 32 << 20;

/// How long an incoming stream waits for its receiving end to be set up (the parts of a job start at slightly
/// different times).
const REGISTRATION_WAIT: Duration = Duration::from_secs(60);

/// The receiving side of a channel, waiting for its sender to connect.
struct Inbox {
    messages: mpsc::Sender<Message>,
    credits: mpsc::UnboundedReceiver<u32>,
}

enum Slot {
    Data(Inbox),
    Lead(mpsc::UnboundedSender<LinkJoin>),
}

/// One worker's end of the exchange: the Flight service other workers connect to, and clients to them.
#[derive(Default)]
pub struct Exchange {
    slots: Mutex<HashMap<String, Slot>>,
    registered: Notify,
    channels: Mutex<HashMap<String, Channel>>,
    /// How to reach workers that serve TLS (`https://` addresses): the cluster CA, and this worker's identity
    /// when they require client certificates.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

type FrameStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send + 'static>>;

fn data_path(job: &str, channel: ChannelKey) -> String {
    format!("data/{job}/{}/{}/{}", channel.edge, channel.from, channel.to)
}

fn lead_path(job: &str) -> String {
    format!("lead/{job}")
}

impl Exchange {
    /// A new exchange, to be served with [`Exchange::service`].
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// An exchange that reaches `https://` peers with `tls`.
    pub fn with_tls(tls: tonic::transport::ClientTlsConfig) -> Arc<Self> {
        Arc::new(Exchange { tls: Some(tls), ..Self::default() })
    }

    /// The Flight service to add to the worker's gRPC server.
    pub fn service(self: &Arc<Self>) -> FlightServiceServer<FlightEndpoint> {
        FlightServiceServer::new(FlightEndpoint(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves the Flight service alone on `listener` (benchmarks and tests; a worker serves it next to its
    /// `WorkerService` instead), with the wide HTTP/2 windows bulk data needs.
    pub async fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) -> Result<(), tonic::transport::Error> {
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .add_service(self.service())
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await
    }

    /// The network of one attempt of a job. `job` must name the attempt (e.g. `orders/3`); `peers` holds the
    /// Flight address of every part, in part order.
    pub fn network(self: &Arc<Self>, job: impl Into<String>, peers: Vec<String>) -> Arc<JobNetwork> {
        Arc::new(JobNetwork { exchange: self.clone(), job: job.into(), peers })
    }

    /// Drops whatever a job attempt registered and nobody connected to (after it ended or failed).
    pub fn forget(&self, job: &str) {
        let (lead, data) = (lead_path(job), format!("data/{job}/"));
        if let Ok(mut slots) = self.slots.lock() {
            slots.retain(|k, _| *k != lead && !k.starts_with(&data));
        }
    }

    fn unregister(&self, path: &str) {
        if let Ok(mut slots) = self.slots.lock() {
            slots.remove(path);
        }
    }

    fn register(&self, path: String, slot: Slot) -> Result<(), ExchangeError> {
        let mut slots = self.slots.lock().map_err(|_| ExchangeError::Peer("exchange registry poisoned".into()))?;
        if slots.insert(path.clone(), slot).is_some() {
            return Err(ExchangeError::Protocol(format!("{path} registered twice")));
        }
        drop(slots);
        self.registered.notify_waiters();
        Ok(())
    }

    /// Waits for `path` to be registered; data slots are taken, lead slots shared.
    async fn claim(&self, path: &str) -> Result<Slot, Status> {
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        loop {
            let notified = self.registered.notified();
            {
                let mut slots = self.slots.lock().map_err(|_| Status::internal("exchange registry poisoned"))?;
                match slots.get(path) {
                    Some(Slot::Lead(tx)) => return Ok(Slot::Lead(tx.clone())),
                    Some(Slot::Data(_)) => {
                        if let Some(slot) = slots.remove(path) {
                            return Ok(slot);
                        }
                    }
                    None => {}
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::not_found(format!(
                    "nothing here receives {path}: that job attempt does not run on this worker"
                )));
            }
        }
    }

    fn client(&self, address: &str) -> Result<FlightServiceClient<Channel>, ExchangeError> {
        let mut channels = self.channels.lock().map_err(|_| ExchangeError::Peer("client cache poisoned".into()))?;
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
                    .map_err(|e| ExchangeError::Peer(format!("worker address {address}: {e}")))?;
                if address.starts_with("https://") {
                    let tls = self.tls.clone().ok_or_else(|| {
                        ExchangeError::Peer(format!(
                            "worker {address} serves TLS: this worker needs the cluster CA (--cluster-ca)"
                        ))
                    })?;
                    endpoint =
                        endpoint.tls_config(tls).map_err(|e| ExchangeError::Peer(format!("TLS for {address}: {e}")))?;
                }
                let c = endpoint
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .initial_stream_window_size(Some(STREAM_WINDOW))
                    .initial_connection_window_size(Some(CONNECTION_WINDOW))
                    .connect_lazy();
                channels.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(FlightServiceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES))
    }
}

/// The Flight service: only `DoExchange` is offered; the rest answers UNIMPLEMENTED.
pub struct FlightEndpoint(Arc<Exchange>);

fn unimplemented<T>(what: &str) -> Result<T, Status> {
    Err(Status::unimplemented(format!("{what} is not offered: workers only exchange job data (DoExchange)")))
}

type Unary<T> = Result<Response<T>, Status>;
type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[async_trait]
impl FlightService for FlightEndpoint {
    type HandshakeStream = Streamed<HandshakeResponse>;
    type ListFlightsStream = Streamed<FlightInfo>;
    type DoGetStream = Streamed<FlightData>;
    type DoPutStream = Streamed<PutResult>;
    type DoActionStream = Streamed<arrow_flight::Result>;
    type ListActionsStream = Streamed<ActionType>;
    type DoExchangeStream = FrameStream;

    async fn handshake(&self, _: Request<Streaming<HandshakeRequest>>) -> Unary<Self::HandshakeStream> {
        unimplemented("Handshake")
    }
    async fn list_flights(&self, _: Request<Criteria>) -> Unary<Self::ListFlightsStream> {
        unimplemented("ListFlights")
    }
    async fn get_flight_info(&self, _: Request<FlightDescriptor>) -> Unary<FlightInfo> {
        unimplemented("GetFlightInfo")
    }
    async fn poll_flight_info(&self, _: Request<FlightDescriptor>) -> Unary<PollInfo> {
        unimplemented("PollFlightInfo")
    }
    async fn get_schema(&self, _: Request<FlightDescriptor>) -> Unary<SchemaResult> {
        unimplemented("GetSchema")
    }
    async fn do_get(&self, _: Request<Ticket>) -> Unary<Self::DoGetStream> {
        unimplemented("DoGet")
    }
    async fn do_put(&self, _: Request<Streaming<FlightData>>) -> Unary<Self::DoPutStream> {
        unimplemented("DoPut")
    }
    async fn do_action(&self, _: Request<Action>) -> Unary<Self::DoActionStream> {
        unimplemented("DoAction")
    }
    async fn list_actions(&self, _: Request<Empty>) -> Unary<Self::ListActionsStream> {
        unimplemented("ListActions")
    }

    async fn do_exchange(&self, request: Request<Streaming<FlightData>>) -> Unary<Self::DoExchangeStream> {
        let mut incoming = request.into_inner();
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an exchange starts with a descriptor"))?;
        let path = first
            .flight_descriptor
            .map(|d| d.path.join("/"))
            .ok_or_else(|| Status::invalid_argument("the first message of an exchange carries its descriptor"))?;
        let (replies, stream) = mpsc::channel::<Result<FlightData, Status>>(16);
        // A link names the part joining after the job: `lead/<job>/<part>`.
        let (slot, part) = match path.strip_prefix("lead/").and_then(|_| path.rsplit_once('/')) {
            Some((lead, part)) => (lead.to_string(), part.parse::<usize>().ok()),
            None => (path.clone(), None),
        };
        match self.0.claim(&slot).await? {
            Slot::Data(inbox) => {
                tokio::spawn(pump(incoming, inbox, replies));
            }
            Slot::Lead(joins) => {
                let part = part.ok_or_else(|| Status::invalid_argument(format!("{path} does not name a part")))?;
                joins
                    .send(LinkJoin { part, incoming, outgoing: replies })
                    .map_err(|_| Status::not_found(format!("{path} no longer takes parts")))?;
            }
        }
        Ok(Response::new(Box::pin(ReceiverStream::new(stream))))
    }
}

/// Moves one channel's frames into its inbox and the receiver's credits back, until either side ends.
async fn pump(
    mut incoming: Streaming<FlightData>,
    mut inbox: Inbox,
    replies: mpsc::Sender<Result<FlightData, Status>>,
) {
    if replies.send(Ok(credit(CHANNEL_CAPACITY as u32))).await.is_err() {
        return;
    }
    let mut decoder = Decoder::default();
    loop {
        tokio::select! {
            frame = incoming.message() => {
                let data = match frame {
                    Ok(Some(d)) => d,
                    // The sender finished (after end-of-stream) or died (then the receiver sees the channel
                    // close without end-of-stream, and its task fails).
                    Ok(None) | Err(_) => return,
                };
                match decoder.decode(data) {
                    Ok(Some(m)) => {
                        if inbox.messages.send(m).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping an exchange stream");
                        let _ = replies.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return;
                    }
                }
            }
            granted = inbox.credits.recv() => {
                let Some(mut n) = granted else { return };
                while let Ok(more) = inbox.credits.try_recv() {
                    n += more;
                }
                if replies.send(Ok(credit(n))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// The network of one job attempt on one worker.
pub struct JobNetwork {
    exchange: Arc<Exchange>,
    job: String,
    peers: Vec<String>,
}

impl JobNetwork {
    fn peer(&self, part: usize) -> Result<&str, ExchangeError> {
        self.peers
            .get(part)
            .map(String::as_str)
            .ok_or_else(|| ExchangeError::Protocol(format!("no address for part {part} ({} known)", self.peers.len())))
    }

    /// Opens a `DoExchange` stream to `part` whose first message carries `path`; returns where to send frames and
    /// the replies.
    async fn open(
        &self,
        part: usize,
        path: Vec<String>,
    ) -> Result<(mpsc::Sender<FlightData>, Streaming<FlightData>), ExchangeError> {
        let address = self.peer(part)?.to_string();
        let mut client = self.exchange.client(&address)?;
        let (tx, rx) = mpsc::channel::<FlightData>(2);
        let hello = FlightData::new().with_descriptor(FlightDescriptor::new_path(path.clone()));
        tx.send(hello).await.map_err(|_| ExchangeError::Peer("exchange stream closed".into()))?;
        let replies = client
            .do_exchange(ReceiverStream::new(rx))
            .await
            .map_err(|s| ExchangeError::Peer(format!("opening {} on {address}: {}", path.join("/"), s.message())))?
            .into_inner();
        Ok((tx, replies))
    }
}

#[async_trait]
impl Network for JobNetwork {
    fn sender(&self, channel: ChannelKey, part: usize) -> nagare_engine::Result<Box<dyn MessageSender>> {
        let credits = Arc::new(Semaphore::new(0));
        let failure = Arc::new(OnceLock::new());
        let (frames_tx, mut frames_rx) = mpsc::channel::<FlightData>(2);
        let path: Vec<String> = data_path(&self.job, channel).split('/').map(str::to_string).collect();
        let me = JobNetwork { exchange: self.exchange.clone(), job: self.job.clone(), peers: self.peers.clone() };
        let (c, f) = (credits.clone(), failure.clone());
        tokio::spawn(async move {
            let result = async {
                let (tx, mut replies) = me.open(part, path).await?;
                let mut tx = Some(tx);
                loop {
                    tokio::select! {
                        frame = frames_rx.recv(), if tx.is_some() => match (frame, &tx) {
                            (Some(frame), Some(t)) => {
                                if t.send(frame).await.is_err() {
                                    return Err(ExchangeError::Peer("the receiving worker closed the channel".into()));
                                }
                            }
                            // The task is done with this channel (after end-of-stream): close our side, and keep
                            // the exchange open until the receiver has read everything and ends it (dropping it
                            // now would reset the stream and lose what is still in flight).
                            _ => tx = None,
                        },
                        reply = replies.message() => match reply {
                            Ok(Some(d)) => c.add_permits(read_credit(&d)? as usize),
                            Ok(None) if tx.is_none() => return Ok(()),
                            Ok(None) => return Err(ExchangeError::Peer("the receiving task went away".into())),
                            Err(s) => return Err(ExchangeError::Peer(format!("receiving worker: {}", s.message()))),
                        },
                    }
                }
            }
            .await;
            if let Err(e) = result {
                let _ = f.set(e.to_string());
            }
            c.close();
        });
        Ok(Box::new(NetworkSender {
            encoder: tokio::sync::Mutex::new(Encoder::default()),
            frames: frames_tx,
            credits,
            failure,
        }))
    }

    fn receiver(&self, channel: ChannelKey) -> nagare_engine::Result<Box<dyn MessageReceiver>> {
        let (messages, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let (credits_tx, credits) = mpsc::unbounded_channel();
        self.exchange.register(data_path(&self.job, channel), Slot::Data(Inbox { messages, credits }))?;
        Ok(Box::new(NetworkReceiver { rx, credits: credits_tx }))
    }

    async fn lead(
        &self,
        parts: usize,
        restored: Option<u64>,
        reports: UnboundedSender<Report>,
    ) -> nagare_engine::Result<Lead> {
        let (joins_tx, joins) = mpsc::unbounded_channel();
        self.exchange.register(lead_path(&self.job), Slot::Lead(joins_tx))?;
        let lead = link::lead(joins, parts, restored, reports, REGISTRATION_WAIT).await;
        self.exchange.unregister(&lead_path(&self.job));
        Ok(lead?)
    }

    async fn follow(&self, part: usize) -> nagare_engine::Result<Follow> {
        let mut path: Vec<String> = lead_path(&self.job).split('/').map(str::to_string).collect();
        path.push(part.to_string());
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        // Part 0's worker may still be starting: retry while it cannot be reached.
        let (tx, replies) = loop {
            match self.open(0, path.clone()).await {
                Ok(pair) => break pair,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "part 0 not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        Ok(link::follow(tx, replies).await?)
    }
}

/// Sends one channel's messages to another worker, within the credits its receiver granted.
struct NetworkSender {
    encoder: tokio::sync::Mutex<Encoder>,
    frames: mpsc::Sender<FlightData>,
    credits: Arc<Semaphore>,
    failure: Arc<OnceLock<String>>,
}

impl NetworkSender {
    fn broken(&self) -> EngineError {
        match self.failure.get() {
            Some(why) => ExchangeError::Peer(why.clone()).into(),
            None => EngineError::Aborted,
        }
    }
}

#[async_trait]
impl MessageSender for NetworkSender {
    async fn send(&self, message: Message) -> nagare_engine::Result<()> {
        let permit = self.credits.acquire().await.map_err(|_| self.broken())?;
        permit.forget();
        let frames = self.encoder.lock().await.encode(message)?;
        for frame in frames {
            self.frames.send(frame).await.map_err(|_| self.broken())?;
        }
        Ok(())
    }
}

/// Receives one channel's messages from another worker, granting a credit for each message taken.
struct NetworkReceiver {
    rx: mpsc::Receiver<Message>,
    credits: mpsc::UnboundedSender<u32>,
}

impl MessageReceiver for NetworkReceiver {
    fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Message>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            let _ = self.credits.send(1);
        }
        polled
    }
}
