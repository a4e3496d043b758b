//! The async driver: runs a [`ReplicatorCore`] against a real store and a [`Transport`].
//!
//! It feeds the core a [`Event::Tick`] every `tick_ms`, carries out its commands (local
//! operations inline, remote requests as concurrent tasks whose answers come back through a
//! bounded channel) and stops when told to.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use geostate_backends::StateBackend;
use tokio::sync::{mpsc, watch};

use crate::core::{Command, CoreConfig, Event, ReplicatorCore, Stats};
use crate::serve::{execute, ServeLimits, Server};
use crate::wire::{Request, Response};

/// Carries requests to peers.
///
/// To ensure correctness, an implementation must deliver each request at most once per call
/// and return the peer's response to that request (or an error); it may fail, time out, or be
/// called concurrently. The core tolerates lost, late and duplicated answers.
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `peer` and waits for its response.
    fn request(
        &self,
        peer: &str,
        request: Request,
    ) -> impl Future<Output = Result<Response, String>> + Send;
}

/// How often an in-process long poll re-checks the peer's feed while it holds the poll.
const POLL_RECHECK_MS: u64 = 5;

/// A transport between regions living in one process: each peer's requests are served from
/// its store directly, by one [`Server`] per region name (which keeps that name's poll
/// sessions). For tests, examples and single-process deployments.
#[derive(Debug)]
pub struct InProcessTransport<B> {
    peers: HashMap<String, Server<B>>,
}

impl<B: StateBackend> InProcessTransport<B> {
    /// A transport reaching the given `(region name, store)` pairs.
    pub fn new(peers: impl IntoIterator<Item = (String, Arc<B>)>) -> Self {
        // Session ids start from the time, so that a puller still polling a session of an
        // earlier transport is told it is unknown rather than served someone else's.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Self {
            peers: peers
                .into_iter()
                .enumerate()
                .map(|(i, (name, store))| {
                    let first = base.wrapping_add((i as u64) << 48);
                    (name, Server::new(store, ServeLimits::default(), first))
                })
                .collect(),
        }
    }
}

impl<B: StateBackend> Transport for InProcessTransport<B> {
    async fn request(&self, peer: &str, request: Request) -> Result<Response, String> {
        let server = self
            .peers
            .get(peer)
            .ok_or_else(|| format!("unknown peer {peer:?}"))?;
        let wait_ms = match &request {
            Request::Heads { wait_ms, .. } => u64::from(*wait_ms),
            _ => 0,
        };
        // A long poll with nothing new is held (re-checked every few milliseconds) until the
        // peer has something or the wait runs out.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(wait_ms);
        let mut response = server.serve(&request).await;
        loop {
            if !response.is_empty_poll() || tokio::time::Instant::now() >= deadline {
                return Ok(response);
            }
            tokio::time::sleep(Duration::from_millis(POLL_RECHECK_MS)).await;
            response = server.serve_held(&request).await;
        }
    }
}

/// Settings of the driver loop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriverConfig {
    /// Protocol settings.
    pub core: CoreConfig,
    /// How often the core is ticked.
    pub tick_ms: u64,
    /// Bound of the channel carrying answers back to the loop.
    pub answers_max: usize,
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            core: CoreConfig::default(),
            tick_ms: 20,
            answers_max: 1024,
        }
    }
}

/// A running replicator's handle on its state, for status and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// What the core has done.
    pub stats: Stats,
    /// Unapplied known feed entries per peer.
    pub backlog: Vec<u64>,
    /// Whether everything known is applied.
    pub idle: bool,
}

/// One region's replicator.
#[derive(Debug)]
pub struct Replicator<B, T> {
    core: ReplicatorCore,
    store: Arc<B>,
    transport: Arc<T>,
    peers: Vec<String>,
    clock: Arc<dyn geostate_regions::Clock>,
    tick_ms: u64,
    answers_max: usize,
}

impl<B: StateBackend, T: Transport> Replicator<B, T> {
    /// The replicator of region `region`, whose store is `store`, pulling from `peers` (region
    /// names, as `transport` knows them and as cursors are keyed; every other region).
    pub fn new(
        config: DriverConfig,
        region: &str,
        store: Arc<B>,
        transport: Arc<T>,
        peers: Vec<String>,
        clock: Arc<dyn geostate_regions::Clock>,
    ) -> Self {
        Self {
            core: ReplicatorCore::new(config.core, region, &peers),
            store,
            transport,
            peers,
            clock,
            tick_ms: config.tick_ms.max(1),
            answers_max: config.answers_max.max(1),
        }
    }

    /// Runs until `shutdown` turns true; `status` receives the core's state after every step.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>, status: watch::Sender<Status>) {
        let (answers_tx, mut answers) = mpsc::channel::<Event>(self.answers_max);
        let mut ticker = tokio::time::interval(Duration::from_millis(self.tick_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut queue: Vec<Event> = vec![Event::Start];
        loop {
            while let Some(event) = queue.pop() {
                let now_ms = self.clock.now_ms();
                for command in self.core.handle(now_ms, event) {
                    match command {
                        Command::Local { id, op } => {
                            let result = execute(self.store.as_ref(), &self.peers, op).await;
                            queue.push(Event::Local { id, result });
                        }
                        Command::Send { id, peer, request } => {
                            let transport = Arc::clone(&self.transport);
                            let name = self.peers.get(peer).cloned().unwrap_or_default();
                            let tx = answers_tx.clone();
                            // The core gives up on the request at its deadline; the task must
                            // too, or a transport that hangs leaks one task per retry.
                            let held_ms = match &request {
                                Request::Heads { wait_ms, .. } => u64::from(*wait_ms),
                                _ => 0,
                            };
                            let limit = Duration::from_millis(
                                held_ms + self.core.config().request_timeout_ms,
                            );
                            tokio::spawn(async move {
                                let result =
                                    tokio::time::timeout(limit, transport.request(&name, request))
                                        .await
                                        .unwrap_or_else(|_| Err("timed out".to_string()));
                                // The loop may have stopped; then the answer is not needed.
                                let _ = tx.send(Event::Remote { id, result }).await;
                            });
                        }
                    }
                }
            }
            let _ = status.send(Status {
                stats: self.core.stats().clone(),
                backlog: (0..self.peers.len())
                    .map(|p| self.core.backlog(p))
                    .collect(),
                idle: self.core.is_idle(),
            });
            tokio::select! {
                _ = shutdown.changed() => {
                    if *shutdown.borrow() {
                        return;
                    }
                }
                _ = ticker.tick() => queue.push(Event::Tick),
                Some(answer) = answers.recv() => queue.push(answer),
            }
        }
    }
}
