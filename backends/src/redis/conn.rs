//! The connection layer: one handle over standalone, Cluster and Sentinel deployments, with
//! pipelining by partition, `EVALSHA` with an `EVAL` fallback, retries with jittered backoff,
//! Sentinel rediscovery, the circuit breaker and optional `WAIT` durability.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{
    ClientTlsConfig, Cmd, ErrorKind, Pipeline, RedisError, ServerErrorKind, TlsCertificates,
    TlsMode, Value,
};

use super::breaker::{Admission, Breaker};
use super::config::{Durability, RedisConfig, RedisMode, RetryConfig};
use super::stats::Counters;
use crate::secure::{redact_url, tls_cause};
use crate::BackendError;

/// A Lua script: its body and SHA-1, so it can run by `EVALSHA` and be sent whole by `EVAL`
/// when the server does not hold it (after a restart, a failover or `SCRIPT FLUSH`).
#[derive(Debug)]
pub(crate) struct Lua {
    pub(crate) name: &'static str,
    body: &'static str,
    sha: String,
}

impl Lua {
    pub(crate) fn new(name: &'static str, body: &'static str) -> Self {
        let sha = redis::Script::new(body).get_hash().to_string();
        Self { name, body, sha }
    }
}

/// One request of a pipeline.
#[derive(Debug)]
pub(crate) enum Req {
    /// A script call (`EVALSHA <sha> <numkeys> <keys..> <args..>`, built once); all its keys
    /// share the group's hash tag.
    Script { lua: Arc<Lua>, cmd: Cmd },
    /// A plain command on a key of the group's hash tag.
    Cmd(Cmd),
}

impl Req {
    pub(crate) fn script(lua: &Arc<Lua>, keys: Vec<Vec<u8>>, args: Vec<Vec<u8>>) -> Self {
        let mut call = ScriptCall::new(lua, keys.len());
        for k in &keys {
            call.arg(k.as_slice());
        }
        for a in &args {
            call.arg(a.as_slice());
        }
        call.into_req()
    }

    fn to_cmd(&self, whole: bool) -> Cmd {
        match self {
            Req::Cmd(cmd) => cmd.clone(),
            Req::Script { cmd, .. } if !whole => cmd.clone(),
            Req::Script { lua, cmd } => {
                // `EVAL <body>` and the same number of keys, keys and arguments.
                let mut eval = redis::cmd("EVAL");
                eval.arg(lua.body);
                for arg in cmd.args_iter().skip(2) {
                    if let redis::Arg::Simple(bytes) = arg {
                        eval.arg(bytes);
                    }
                }
                eval
            }
        }
    }
}

/// A script call built in place: keys then arguments are written straight into the command's
/// buffer (no per-argument allocation).
pub(crate) struct ScriptCall {
    lua: Arc<Lua>,
    cmd: Cmd,
}

impl ScriptCall {
    /// A call of `lua` with `keys` keys (the first `keys` arguments pushed are the keys).
    pub(crate) fn new(lua: &Arc<Lua>, keys: usize) -> Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(lua.sha.as_str()).arg(keys);
        Self {
            lua: Arc::clone(lua),
            cmd,
        }
    }

    /// Appends a key or an argument.
    pub(crate) fn arg<T: redis::ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        self.cmd.arg(arg);
        self
    }

    /// Appends one key or argument made of `parts` one after the other.
    pub(crate) fn arg_parts(&mut self, parts: &[&[u8]]) -> &mut Self {
        use redis::RedisWrite;
        use std::io::Write;
        let mut writer = self.cmd.writer_for_next_arg();
        for part in parts {
            // Writing to the command's in-memory buffer cannot fail.
            let _ = writer.write_all(part);
        }
        drop(writer);
        self
    }

    pub(crate) fn into_req(self) -> Req {
        Req::Script {
            lua: self.lua,
            cmd: self.cmd,
        }
    }
}

/// Requests that go to one hash slot (one partition, or the conflict feed), pipelined in
/// order on one connection.
#[derive(Debug, Default)]
pub(crate) struct Group {
    pub(crate) reqs: Vec<Req>,
    /// Whether the requests write (then `WAIT` durability applies).
    pub(crate) writes: bool,
}

/// How a failed request may be repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Safety {
    /// Repeating it changes nothing: retried after any transport error.
    Idempotent,
    /// Must not run twice: retried only when the server certainly did not run it.
    Once,
}

/// Why a group failed as a whole.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    /// Whether the requests may have run (a reply was lost) or certainly did not.
    pub(crate) maybe_ran: bool,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn into_error(self) -> BackendError {
        if self.maybe_ran {
            BackendError::Unavailable(format!(
                "{}; the operation may or may not have taken effect",
                self.message
            ))
        } else {
            BackendError::Unavailable(format!("{}; nothing was written", self.message))
        }
    }
}

/// The replies of one group, one per request (a request's own error is a
/// `Value::ServerError`).
pub(crate) type Replies = Result<Vec<Value>, Failure>;

/// The connection to the servers, whichever the deployment.
enum Link {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
    Sentinel(Box<SentinelLink>),
}

struct SentinelLink {
    client: tokio::sync::Mutex<SentinelClient>,
    /// The current master connection and its generation.
    current: RwLock<(u64, ConnectionManager)>,
    /// When rediscovery last ran.
    last_discovery: Mutex<Instant>,
}

/// Everything needed to talk to the servers.
pub(crate) struct Conn {
    link: Link,
    manager_config: ConnectionManagerConfig,
    retry: RetryConfig,
    durability: Durability,
    response_timeout: Duration,
    connect_timeout: Duration,
    pub(crate) breaker: Arc<Breaker>,
    pub(crate) counters: Arc<Counters>,
    rng: Jitter,
}

/// Most often the sentinels are asked for the master.
const REDISCOVERY_INTERVAL_MIN: Duration = Duration::from_millis(100);

fn redis_failure(e: &RedisError, what: &str) -> Failure {
    let maybe_ran = !(e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::NoScript
                    | ServerErrorKind::Moved
                    | ServerErrorKind::Ask
                    | ServerErrorKind::CrossSlot
            ) | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::InvalidClientConfig
                | ErrorKind::AuthenticationFailed
        ));
    Failure {
        maybe_ran,
        message: format!("redis {what}: {e}"),
    }
}

/// Whether a transport-level error says the store (not the request) is in trouble.
fn is_transport(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || matches!(
            e.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::ClusterDown
                    | ServerErrorKind::TryAgain
                    | ServerErrorKind::MasterDown
                    | ServerErrorKind::BusyLoading
            ) | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Client
        )
}

/// A per-request server error that means "not run, try again later".
fn retryable_server_error(kind: Option<ServerErrorKind>) -> bool {
    matches!(
        kind,
        Some(
            ServerErrorKind::ReadOnly
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::MasterDown
                | ServerErrorKind::BusyLoading
        )
    )
}

/// A connection failure: [`BackendError::Tls`] when TLS refused it (an untrusted or
/// misnamed certificate, a server that does not speak TLS), else `Unavailable`.
fn connect_failure(e: RedisError) -> BackendError {
    match tls_cause(&e) {
        Some(cause) => BackendError::Tls(format!("redis: {cause}")),
        // The cluster client reports its nodes' connection failures as text ("Failed to
        // create initial connections - Io: ..."), which drops the rustls error from the
        // chain: recognise rustls's own wording in it.
        None if RUSTLS_WORDING.iter().any(|w| e.to_string().contains(w)) => {
            BackendError::Tls(format!("redis: {e}"))
        }
        None => BackendError::Unavailable(format!("cannot connect to redis: {e}")),
    }
}

/// How rustls words a refused handshake (`rustls::Error`'s `Display`): a fatal alert from the
/// peer (e.g. a client certificate it requires) or a certificate we refused.
const RUSTLS_WORDING: [&str; 3] = [
    "received fatal alert",
    "invalid peer certificate",
    "peer is incompatible",
];

/// Reads a PEM file named in [`super::RedisTls`]; the error names the file, never its bytes.
fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, BackendError> {
    std::fs::read(path)
        .map_err(|e| BackendError::Tls(format!("cannot read the {what} {}: {e}", path.display())))
}

/// The certificates to hand to redis-rs, or `None` to trust the system store without a
/// client certificate (redis-rs' defaults for `rediss://`).
fn certificates(config: &RedisConfig) -> Result<Option<TlsCertificates>, BackendError> {
    if !config.uses_tls() {
        return Ok(None);
    }
    // redis-rs builds its rustls configuration with the process-wide default crypto
    // provider. Make it ring (what this crate compiles in) unless the application chose one.
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let tls = &config.tls;
    if !tls.is_set() {
        return Ok(None);
    }
    let root_cert = match &tls.ca_cert_file {
        Some(path) => Some(read_pem(path, "CA certificate file")?),
        None => None,
    };
    let client_tls = match (&tls.client_cert_file, &tls.client_key_file) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: read_pem(cert, "client certificate file")?,
            client_key: read_pem(key, "client key file")?,
        }),
        _ => None,
    };
    Ok(Some(TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A client for one server URL, with the configured certificates if any.
fn client(url: &str, certs: &Option<TlsCertificates>) -> Result<redis::Client, BackendError> {
    let built = match certs {
        Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
        None => redis::Client::open(url),
    };
    built.map_err(|e| BackendError::InvalidArgument(format!("redis URL {}: {e}", redact_url(url))))
}

impl Conn {
    /// Connects according to `config` (already validated).
    pub(crate) async fn connect(config: &RedisConfig) -> Result<Self, BackendError> {
        let unavailable = connect_failure;
        let invalid = |e: RedisError| BackendError::InvalidArgument(format!("redis config: {e}"));
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(Some(config.response_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let certs = certificates(config)?;
        let connect = async {
            match &config.mode {
                RedisMode::Standalone => {
                    let url = config.urls.first().map(String::as_str).unwrap_or_default();
                    let client = client(url, &certs)?;
                    let manager =
                        ConnectionManager::new_with_config(client, manager_config.clone())
                            .await
                            .map_err(unavailable)?;
                    Ok::<Link, BackendError>(Link::Standalone(manager))
                }
                RedisMode::Cluster => {
                    let mut builder =
                        redis::cluster::ClusterClientBuilder::new(config.urls.clone());
                    if config.uses_tls() {
                        // Every node the cluster reports is reached with TLS too.
                        builder = builder.tls(TlsMode::Secure);
                    }
                    if let Some(certs) = &certs {
                        builder = builder.certs(certs.clone());
                    }
                    let client = builder
                        .connection_timeout(config.connect_timeout)
                        .response_timeout(config.response_timeout)
                        .retries(config.retry.attempts_max.max(1))
                        .min_retry_wait(
                            u64::try_from(config.retry.backoff_min.as_millis()).unwrap_or(10),
                        )
                        .max_retry_wait(
                            u64::try_from(config.retry.backoff_max.as_millis()).unwrap_or(1_000),
                        )
                        .build()
                        .map_err(invalid)?;
                    let conn = client.get_async_connection().await.map_err(unavailable)?;
                    Ok(Link::Cluster(conn))
                }
                RedisMode::Sentinel { service_name } => {
                    let mut client = sentinel_client(config, service_name, &certs)?;
                    let master = client.async_get_client().await.map_err(unavailable)?;
                    let manager =
                        ConnectionManager::new_with_config(master, manager_config.clone())
                            .await
                            .map_err(unavailable)?;
                    Ok(Link::Sentinel(Box::new(SentinelLink {
                        client: tokio::sync::Mutex::new(client),
                        current: RwLock::new((0, manager)),
                        last_discovery: Mutex::new(Instant::now()),
                    })))
                }
            }
        };
        let link = match tokio::time::timeout(config.connect_timeout * 4, connect).await {
            Ok(link) => link?,
            Err(_) => {
                return Err(BackendError::Unavailable(format!(
                    "cannot connect to redis at {:?} within {:?}",
                    config
                        .urls
                        .iter()
                        .map(|u| redact_url(u))
                        .collect::<Vec<_>>(),
                    config.connect_timeout * 4
                )))
            }
        };
        Ok(Self {
            link,
            manager_config,
            retry: config.retry.clone(),
            durability: config.durability.clone(),
            response_timeout: config.response_timeout,
            connect_timeout: config.connect_timeout,
            breaker: Arc::new(Breaker::new(config.breaker.clone())),
            counters: Arc::new(Counters::default()),
            rng: Jitter::new(),
        })
    }

    /// Whether requests of different hash slots must travel in different pipelines (Redis
    /// Cluster). Standalone and Sentinel deployments have one server to send everything to.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.link, Link::Cluster(_))
    }

    /// The current connection's generation (Sentinel mode changes it on every rediscovery).
    fn generation(&self) -> u64 {
        match &self.link {
            Link::Sentinel(s) => s.current.read().map(|g| g.0).unwrap_or_default(),
            _ => 0,
        }
    }

    /// Sends one pipeline over the current connection.
    async fn query(&self, pipe: &Pipeline) -> Result<Value, RedisError> {
        let run = async {
            match &self.link {
                Link::Standalone(m) => pipe.query_async::<Value>(&mut m.clone()).await,
                Link::Cluster(c) => pipe.query_async::<Value>(&mut c.clone()).await,
                Link::Sentinel(s) => {
                    let manager = match s.current.read() {
                        Ok(g) => g.1.clone(),
                        Err(poisoned) => poisoned.into_inner().1.clone(),
                    };
                    pipe.query_async::<Value>(&mut manager.clone()).await
                }
            }
        };
        // The drivers time out too; this bounds what they might not (a hung reconnect).
        match tokio::time::timeout(self.response_timeout + self.connect_timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(RedisError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no reply within the response timeout",
            ))),
        }
    }

    /// Sentinel mode: asks the sentinels for the current master and reconnects to it, unless
    /// another task already did since generation `seen`.
    async fn rediscover(&self, seen: u64) {
        let Link::Sentinel(s) = &self.link else {
            return;
        };
        let mut client = s.client.lock().await;
        if self.generation() != seen {
            return;
        }
        {
            let mut last = match s.last_discovery.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if last.elapsed() < REDISCOVERY_INTERVAL_MIN {
                return;
            }
            *last = Instant::now();
        }
        let discover = async {
            let master = client.async_get_client().await?;
            ConnectionManager::new_with_config(master, self.manager_config.clone()).await
        };
        if let Ok(Ok(manager)) = tokio::time::timeout(self.connect_timeout * 2, discover).await {
            self.counters.rediscoveries.fetch_add(1, Ordering::Relaxed);
            let mut current = match s.current.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *current = (current.0 + 1, manager);
        }
    }

    /// A random commit token.
    pub(crate) fn token(&self) -> u64 {
        self.rng.below(u64::MAX)
    }

    /// A delay before retry `attempt` (1-based): uniform below `min * 2^(attempt-1)`, capped.
    pub(crate) fn backoff(&self, attempt: u32, min: Duration, max: Duration) -> Duration {
        let exp = min.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let bound = exp.min(max).max(Duration::from_micros(1));
        let nanos = u64::try_from(bound.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.rng.below(nanos))
    }

    /// Runs `groups` concurrently (each group in order, as one pipeline) and returns each
    /// group's replies.
    pub(crate) async fn run(&self, groups: Vec<Group>, safety: Safety) -> Vec<Replies> {
        join_all(groups.iter().map(|g| self.run_group(g, safety)).collect()).await
    }

    /// Runs one group of requests with retries, the `EVAL` fallback and `WAIT`.
    async fn run_group(&self, group: &Group, safety: Safety) -> Replies {
        let n = group.reqs.len();
        if n == 0 {
            return Ok(Vec::new());
        }
        let wait = match (&self.durability, group.writes) {
            (Durability::Wait { replicas, timeout }, true) => Some((*replicas, *timeout)),
            _ => None,
        };
        let mut replies: Vec<Value> = vec![Value::Nil; n];
        let mut pending: Vec<usize> = (0..n).collect();
        let mut whole = vec![false; n];
        let mut attempt: u32 = 0;
        loop {
            let admission = self.breaker.admit();
            if admission == Admission::Reject {
                self.counters
                    .breaker_rejections
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Failure {
                    maybe_ran: false,
                    message: "redis circuit breaker is open (the store failed repeatedly)".into(),
                });
            }
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in &pending {
                pipe.add_command(group.reqs[i].to_cmd(whole[i]));
            }
            if let Some((replicas, timeout)) = wait {
                pipe.cmd("WAIT")
                    .arg(replicas)
                    .arg(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
            }
            let generation = self.generation();
            let result = self.query(&pipe).await;
            let values = match result {
                Ok(Value::Array(values))
                    if values.len() == pending.len() + usize::from(wait.is_some()) =>
                {
                    values
                }
                Ok(other) => {
                    self.breaker.record(admission, true);
                    return Err(Failure {
                        maybe_ran: true,
                        message: format!("redis returned an unexpected pipeline reply: {other:?}"),
                    });
                }
                Err(e) => {
                    let transport = is_transport(&e);
                    self.breaker.record(admission, !transport);
                    if transport {
                        self.rediscover(generation).await;
                    }
                    let failure = redis_failure(&e, "request failed");
                    attempt += 1;
                    let may_retry = transport
                        && (safety == Safety::Idempotent || !failure.maybe_ran)
                        && attempt < self.retry.attempts_max;
                    if !may_retry {
                        return Err(failure);
                    }
                    self.counters
                        .transport_retries
                        .fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(self.backoff(
                        attempt,
                        self.retry.backoff_min,
                        self.retry.backoff_max,
                    ))
                    .await;
                    continue;
                }
            };
            let mut values = values.into_iter();
            let mut again = Vec::new();
            let mut must_wait = false;
            let mut read_only = false;
            for (&i, value) in pending.iter().zip(values.by_ref()) {
                match &value {
                    Value::ServerError(e)
                        if e.kind() == Some(ServerErrorKind::NoScript)
                            && !whole[i]
                            && matches!(group.reqs[i], Req::Script { .. }) =>
                    {
                        self.counters.script_loads.fetch_add(1, Ordering::Relaxed);
                        whole[i] = true;
                        again.push(i);
                    }
                    Value::ServerError(e) if retryable_server_error(e.kind()) => {
                        read_only |= e.kind() == Some(ServerErrorKind::ReadOnly);
                        must_wait = true;
                        again.push(i);
                        replies[i] = value;
                    }
                    _ => replies[i] = value,
                }
            }
            self.breaker.record(admission, !must_wait);
            if let (Some((replicas, _)), Some(acked)) = (wait, values.next()) {
                let acked = match acked {
                    Value::Int(n) => n,
                    _ => -1,
                };
                if acked < i64::from(replicas) && again.len() < pending.len() {
                    self.counters
                        .wait_shortfalls
                        .fetch_add(1, Ordering::Relaxed);
                    return Err(Failure {
                        maybe_ran: true,
                        message: format!(
                            "WAIT: only {acked} of {replicas} replicas confirmed the write in time \
                             (the primary applied it; a failover may lose it)"
                        ),
                    });
                }
            }
            if again.is_empty() {
                return Ok(replies);
            }
            if must_wait {
                if read_only {
                    self.rediscover(generation).await;
                }
                attempt += 1;
                if attempt >= self.retry.attempts_max {
                    // The replies of the refused requests hold their server errors.
                    return Ok(replies);
                }
                self.counters
                    .transport_retries
                    .fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(self.backoff(
                    attempt,
                    self.retry.backoff_min,
                    self.retry.backoff_max,
                ))
                .await;
            }
            pending = again;
        }
    }

    /// `PING` (every node of a cluster), bypassing the breaker; returns the round-trip time.
    pub(crate) async fn ping(&self) -> Result<Duration, BackendError> {
        let started = Instant::now();
        let generation = self.generation();
        let cmd = redis::cmd("PING");
        let run = async {
            match &self.link {
                Link::Standalone(m) => cmd.query_async::<Value>(&mut m.clone()).await,
                Link::Cluster(c) => cmd.query_async::<Value>(&mut c.clone()).await,
                Link::Sentinel(s) => {
                    let manager = match s.current.read() {
                        Ok(g) => g.1.clone(),
                        Err(p) => p.into_inner().1.clone(),
                    };
                    cmd.query_async::<Value>(&mut manager.clone()).await
                }
            }
        };
        let result = tokio::time::timeout(self.response_timeout, run).await;
        match result {
            Ok(Ok(_)) => Ok(started.elapsed()),
            Ok(Err(e)) => {
                if is_transport(&e) {
                    self.rediscover(generation).await;
                }
                Err(BackendError::Unavailable(format!("redis PING failed: {e}")))
            }
            Err(_) => Err(BackendError::Unavailable(format!(
                "redis PING got no reply within {:?}",
                self.response_timeout
            ))),
        }
    }
}

/// The Sentinel client. With `rediss://` sentinel URLs both the sentinels and the master
/// they name are reached with TLS (redis-rs would otherwise connect to the master in
/// plaintext), with the configured certificates.
fn sentinel_client(
    config: &RedisConfig,
    service_name: &str,
    certs: &Option<TlsCertificates>,
) -> Result<SentinelClient, BackendError> {
    let invalid = |e: RedisError| BackendError::InvalidArgument(format!("redis config: {e}"));
    if !config.uses_tls() {
        return SentinelClient::build(
            config.urls.clone(),
            service_name,
            None,
            SentinelServerType::Master,
        )
        .map_err(invalid);
    }
    let mut sentinels = Vec::with_capacity(config.urls.len());
    let mut auth = None;
    for url in &config.urls {
        let info = client(url, certs)?.get_connection_info().clone();
        let settings = info.redis_settings();
        if auth.is_none() {
            auth = Some((
                settings.username().map(str::to_string),
                settings.password().map(str::to_string),
            ));
        }
        sentinels.push(info.addr().clone());
    }
    let mut builder = redis::sentinel::SentinelClientBuilder::new(
        sentinels,
        service_name,
        SentinelServerType::Master,
    )
    .map_err(invalid)?
    .set_client_to_redis_tls_mode(TlsMode::Secure);
    if let Some(certs) = certs {
        builder = builder.set_client_to_redis_certificates(certs.clone());
    }
    if let Some((username, password)) = auth {
        if let Some(username) = username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = password {
            builder = builder.set_client_to_sentinel_password(password);
        }
    }
    builder.build().map_err(invalid)
}

/// Polls every future to completion and returns their outputs in order (no task is spawned,
/// so the futures may borrow).
pub(crate) async fn join_all<F: Future>(futures: Vec<F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

/// Jitter for backoff delays: SplitMix64 seeded from the standard library's per-process
/// random hasher keys. Only delays depend on it, never a result.
#[derive(Debug)]
struct Jitter(AtomicU64);

impl Jitter {
    fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        Self(AtomicU64::new(h.finish()))
    }

    /// Uniform in `0..n` (n > 0), near enough for jitter.
    fn below(&self, n: u64) -> u64 {
        let mut z = self
            .0
            .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        z % n.max(1)
    }
}
