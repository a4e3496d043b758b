//! Which store each region keeps its state in, and the real stores of a real-store run.
//!
//! A run's [`StoreChoice`] comes from the scenario (`store = "redis"`) or from
//! `geostate simulate --store`. With [`StoreChoice::Memory`] (the default) every region is an
//! embedded [`MemoryBackend`](geostate_backends::MemoryBackend) and nothing here runs. With
//! `redis`, `postgres` or `mixed`, a [`Deployment`] gives every region a store of its own:
//!
//! - **Redis**: one `redis-server` process per region, started on a free loopback port with
//!   persistence off (`--save "" --appendonly no`) in a temporary directory, and killed when
//!   the run ends;
//! - **PostgreSQL**: one schema per region (`gs_sim_<pid>_<time>_<n>_r<region>`), created by
//!   this module in the database [`StoreOptions::postgres_url`] names and dropped when the run
//!   ends. Nothing else on the server is touched.
//!
//! Cleanup also happens when the run fails or panics (the deployment's `Drop`), and after
//! [`request_stop`] (what a Ctrl-C handler calls: the run stops at its next event, removes its
//! stores and returns [`SimError::Interrupted`]). The engine
//! drives real stores by blocking on each operation in turn on the deployment's
//! single-threaded tokio runtime (see [`crate::engine`]), so the order of events stays a
//! function of the seed.
//!
//! ```
//! use geostate_sim::stores::{StoreChoice, StoreKind};
//! use geostate_sim::Scenario;
//! let mixed: StoreChoice = "mixed".parse().unwrap();
//! assert_eq!(mixed.kind_of(0), StoreKind::Redis);
//! assert_eq!(mixed.kind_of(1), StoreKind::Postgres);
//! assert_eq!(StoreChoice::default(), StoreChoice::Memory);
//! assert!("mysql".parse::<StoreChoice>().is_err());
//!
//! let head = "name = \"x\"\nregions = 2\nkeys = 10\nduration_s = 1.0\n";
//! let s = Scenario::from_toml_str(&format!("{head}store = \"postgres\"")).unwrap();
//! assert_eq!(s.store, StoreChoice::Postgres);
//! assert_eq!(Scenario::from_toml_str(head).unwrap().store, StoreChoice::Memory);
//! assert!(Scenario::from_toml_str(&format!("{head}store = \"mysql\"")).is_err());
//! ```

use std::fmt;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use geostate_backends::postgres::{redact_url, PostgresBackend, PostgresConfig};
use geostate_backends::redis::{RedisBackend, RedisConfig};
use geostate_backends::{AnyStore, Layout};
use serde::Deserialize;
use sqlx::{Connection as _, PgConnection};

use crate::SimError;

/// Which store the regions of a run use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum StoreChoice {
    /// Every region on the embedded in-memory store (no servers, fastest).
    #[default]
    Memory,
    /// Every region on its own `redis-server`.
    Redis,
    /// Every region on its own PostgreSQL schema.
    Postgres,
    /// Alternating: even regions on Redis, odd regions on PostgreSQL.
    Mixed,
}

impl StoreChoice {
    /// Every choice, in the order `--help` lists them.
    pub const ALL: [StoreChoice; 4] = [
        StoreChoice::Memory,
        StoreChoice::Redis,
        StoreChoice::Postgres,
        StoreChoice::Mixed,
    ];

    /// The store region `region` runs on.
    pub fn kind_of(self, region: usize) -> StoreKind {
        match self {
            StoreChoice::Memory => StoreKind::Memory,
            StoreChoice::Redis => StoreKind::Redis,
            StoreChoice::Postgres => StoreKind::Postgres,
            StoreChoice::Mixed if region % 2 == 0 => StoreKind::Redis,
            StoreChoice::Mixed => StoreKind::Postgres,
        }
    }

    /// The name used on the command line and in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            StoreChoice::Memory => "memory",
            StoreChoice::Redis => "redis",
            StoreChoice::Postgres => "postgres",
            StoreChoice::Mixed => "mixed",
        }
    }

    /// Whether the run needs real servers.
    pub fn is_real(self) -> bool {
        self != StoreChoice::Memory
    }
}

impl fmt::Display for StoreChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for StoreChoice {
    type Err = SimError;

    fn from_str(text: &str) -> Result<Self, SimError> {
        StoreChoice::ALL
            .into_iter()
            .find(|c| c.name() == text)
            .ok_or_else(|| {
                SimError::Scenario(format!(
                    "unknown store {text:?}: expected memory, redis, postgres or mixed"
                ))
            })
    }
}

/// The store one region runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StoreKind {
    /// The embedded in-memory store.
    Memory,
    /// A `redis-server` of its own.
    Redis,
    /// A PostgreSQL schema of its own.
    Postgres,
}

impl StoreKind {
    /// `memory`, `redis` or `postgres`.
    pub fn name(self) -> &'static str {
        match self {
            StoreKind::Memory => "memory",
            StoreKind::Redis => "redis",
            StoreKind::Postgres => "postgres",
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The store a region used in a run, for reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreInfo {
    /// The kind of store.
    pub kind: StoreKind,
    /// Where it was: `in-process`, `redis-server 127.0.0.1:<port>`, or
    /// `schema <name> at <url>` (password hidden). Gone after the run.
    pub location: String,
}

impl StoreInfo {
    /// The embedded store.
    pub fn memory() -> Self {
        Self {
            kind: StoreKind::Memory,
            location: "in-process".into(),
        }
    }
}

/// Where the real stores of a run come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreOptions {
    /// The PostgreSQL database in which each PostgreSQL region gets a schema of its own
    /// (created and dropped by the run). Default: `postgres://postgres@127.0.0.1:5432/test`,
    /// the server `scripts/ensure-postgres` sets up.
    pub postgres_url: String,
    /// The `redis-server` program (Redis 7 or newer) started once per Redis region. Default:
    /// `redis-server`, looked up on `PATH`.
    pub redis_server: PathBuf,
    /// How long a server may take to start answering, and a connection to open.
    pub startup_timeout: Duration,
}

/// The PostgreSQL database used when none is given.
pub const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            postgres_url: POSTGRES_URL_DEFAULT.into(),
            redis_server: PathBuf::from("redis-server"),
            startup_timeout: Duration::from_secs(15),
        }
    }
}

/// Most attempts at starting a `redis-server` (another process may take the free port found
/// before the server binds it).
const REDIS_START_ATTEMPTS_MAX: u32 = 3;
/// How long a statement dropping a schema waits for locks.
const DROP_LOCK_TIMEOUT: &str = "15s";
/// Connections of each PostgreSQL region store: the engine runs one operation at a time.
const POSTGRES_POOL_MAX: u32 = 2;

/// Tells apart the deployments of one process.
static DEPLOYMENTS: AtomicU64 = AtomicU64::new(0);

/// Set by [`request_stop`]; never cleared.
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every real-store run of this process to stop: each stops at its next event (or before
/// starting its next server), removes its stores and returns [`SimError::Interrupted`]; later
/// real-store runs refuse to start. For a Ctrl-C handler: killed outright, a process cannot
/// drop its schemas. Runs on the embedded store ignore it.
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called.
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// A name fragment unique to this deployment: process, time and a per-process count.
fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = DEPLOYMENTS.fetch_add(1, Ordering::Relaxed);
    format!("{}_{:x}_{n}", std::process::id(), nanos % (1 << 40))
}

fn store_error(what: impl fmt::Display) -> SimError {
    SimError::Store(what.to_string())
}

/// A `redis-server` process this run started; killed (and its directory removed) on drop.
#[derive(Debug)]
struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

/// A loopback port nobody listens on now.
fn free_port() -> Result<u16, SimError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| store_error(format!("no free loopback port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| store_error(format!("no free loopback port: {e}")))
}

/// Whether a Redis server answers `PING` on `port`.
fn answers_ping(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts a server on a free loopback port and waits until it answers `PING`.
    fn start(program: &Path, tag: &str, timeout: Duration) -> Result<Self, SimError> {
        let mut last = String::new();
        for _ in 0..REDIS_START_ATTEMPTS_MAX {
            let port = free_port()?;
            let dir = std::env::temp_dir().join(format!("geostate-sim-{tag}-{port}"));
            std::fs::create_dir_all(&dir).map_err(|e| {
                store_error(format!("creating the directory {}: {e}", dir.display()))
            })?;
            let log_path = dir.join("redis.log");
            let log = std::fs::File::create(&log_path).and_then(|f| Ok((f.try_clone()?, f)));
            let (out, err) = match log {
                Ok(files) => files,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(store_error(format!("creating {}: {e}", log_path.display())));
                }
            };
            let spawned = Command::new(program)
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--loglevel", "warning", "--dir"])
                .arg(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(store_error(format!(
                        "cannot start {}: {e}; install Redis 7 or newer (scripts/ensure-redis \
                         installs it)",
                        program.display()
                    )));
                }
            };
            // From here on the guard kills the process, whatever happens.
            let mut server = RedisServer {
                child: Some(child),
                port,
                dir,
            };
            match server.wait_until_ready(timeout) {
                Ok(()) => return Ok(server),
                Err(e) => {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // Someone took the port between our probe and the server's bind: retry.
                    if log.contains("Address already in use") {
                        last = e;
                        continue;
                    }
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    return Err(store_error(format!(
                        "{e}{}{}",
                        if tail.is_empty() { "" } else { "; its log: " },
                        tail.join(" | ")
                    )));
                }
            }
        }
        Err(store_error(format!(
            "redis-server could not bind a free port in {REDIS_START_ATTEMPTS_MAX} attempts: {last}"
        )))
    }

    fn wait_until_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!(
                        "redis-server on port {} exited at start ({status})",
                        self.port
                    ));
                }
            }
            if answers_ping(self.port) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redis-server on port {} does not answer PING within {timeout:?}",
                    self.port
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server, waits for it to exit and removes its directory.
    fn stop(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        if let Some(mut child) = self.child.take() {
            // An error here means it already exited; `wait` reaps it either way.
            let _ = child.kill();
            if let Err(e) = child.wait() {
                result = Err(format!("redis-server on port {}: {e}", self.port));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        result
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The real stores of one run, one per region, and everything needed to remove them.
///
/// [`Deployment::stop`] removes them and reports what could not be removed; dropping a
/// deployment that was not stopped (a failed or panicking run) removes them too, best effort.
#[derive(Debug)]
pub struct Deployment {
    runtime: tokio::runtime::Runtime,
    stores: Vec<Arc<AnyStore>>,
    infos: Vec<StoreInfo>,
    redis: Vec<RedisServer>,
    postgres_url: String,
    /// Schemas this run created (each registered just after its `CREATE SCHEMA` succeeded).
    schemas: Vec<String>,
    stopped: bool,
}

impl Deployment {
    /// Starts one store per region as `choice` says, each laid out as `layout`. Nothing is
    /// left behind when this fails. `seed` seeds the stores' own random choices (PostgreSQL's
    /// retry jitter).
    ///
    /// Errors: [`SimError::Scenario`] for the memory choice (it needs no deployment) or when
    /// called from inside an async runtime (the engine blocks on every store operation);
    /// [`SimError::Store`] when a server cannot be started or reached;
    /// [`SimError::Interrupted`] after [`request_stop`].
    pub fn start(
        choice: StoreChoice,
        regions: usize,
        layout: &Layout,
        options: &StoreOptions,
        seed: u64,
    ) -> Result<Self, SimError> {
        if !choice.is_real() {
            return Err(SimError::Scenario(
                "the memory store needs no deployment".into(),
            ));
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(SimError::Scenario(
                "a real-store simulation blocks on every store operation: run it outside an \
                 async runtime (e.g. in tokio::task::spawn_blocking)"
                    .into(),
            ));
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| SimError::Internal(format!("cannot start the async runtime: {e}")))?;
        let mut deployment = Deployment {
            runtime,
            stores: Vec::with_capacity(regions),
            infos: Vec::with_capacity(regions),
            redis: Vec::new(),
            postgres_url: options.postgres_url.clone(),
            schemas: Vec::new(),
            stopped: false,
        };
        // On an error below, dropping `deployment` removes what was made so far.
        let id = run_id();
        let mut admin = None;
        for region in 0..regions {
            if stop_requested() {
                return Err(SimError::Interrupted);
            }
            match choice.kind_of(region) {
                StoreKind::Redis => deployment.start_redis(region, &id, layout, options)?,
                StoreKind::Postgres => {
                    deployment.start_postgres(region, &id, layout, options, seed, &mut admin)?;
                }
                StoreKind::Memory => {
                    return Err(SimError::Internal(
                        "a real-store deployment was asked for a memory region".into(),
                    ))
                }
            }
        }
        if let Some(conn) = admin {
            let _ = deployment.runtime.block_on(conn.close());
        }
        Ok(deployment)
    }

    fn start_redis(
        &mut self,
        region: usize,
        id: &str,
        layout: &Layout,
        options: &StoreOptions,
    ) -> Result<(), SimError> {
        let server = RedisServer::start(
            &options.redis_server,
            &format!("{id}-r{region}"),
            options.startup_timeout,
        )?;
        let port = server.port;
        self.redis.push(server);
        let config = RedisConfig::standalone(format!("redis://127.0.0.1:{port}/"))
            .with_layout(layout.clone());
        let store = self
            .runtime
            .block_on(RedisBackend::connect(config))
            .map_err(|e| store_error(format!("redis-server on port {port}: {e}")))?;
        self.stores.push(Arc::new(AnyStore::Redis(Box::new(store))));
        self.infos.push(StoreInfo {
            kind: StoreKind::Redis,
            location: format!("redis-server 127.0.0.1:{port}"),
        });
        Ok(())
    }

    fn start_postgres(
        &mut self,
        region: usize,
        id: &str,
        layout: &Layout,
        options: &StoreOptions,
        seed: u64,
        admin: &mut Option<PgConnection>,
    ) -> Result<(), SimError> {
        let url = &options.postgres_url;
        let shown = redact_url(url);
        let timeout = options.startup_timeout;
        if admin.is_none() {
            // A timer needs the runtime: made inside the future the runtime runs.
            let connecting =
                async { tokio::time::timeout(timeout, PgConnection::connect(url)).await };
            let conn = match self.runtime.block_on(connecting) {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    return Err(store_error(format!(
                        "cannot connect to PostgreSQL at {shown}: {e} (scripts/ensure-postgres \
                         starts a local server)"
                    )))
                }
                Err(_) => {
                    return Err(store_error(format!(
                        "cannot connect to PostgreSQL at {shown}: no answer within {timeout:?}"
                    )))
                }
            };
            *admin = Some(conn);
        }
        let Some(conn) = admin.as_mut() else {
            return Err(SimError::Internal("no PostgreSQL connection".into()));
        };
        let schema = format!("gs_sim_{id}_r{region}");
        // Without IF NOT EXISTS: a schema that is there already is not ours to use or drop.
        let create = format!("CREATE SCHEMA \"{schema}\"");
        self.runtime
            .block_on(sqlx::query(sqlx::AssertSqlSafe(create)).execute(&mut *conn))
            .map_err(|e| store_error(format!("creating schema {schema} at {shown}: {e}")))?;
        self.schemas.push(schema.clone());
        let mut config = PostgresConfig::new(url.clone());
        config.schema = schema.clone();
        config.layout = layout.clone();
        config.primary_pool_max = POSTGRES_POOL_MAX;
        config.acquire_timeout = timeout;
        config.rng_seed = Some(seed);
        config.create_schema = false;
        // A throwaway store: its commits need not wait for the disk.
        config.synchronous_commit = false;
        config.application_name = "geostate-sim".into();
        let store = self
            .runtime
            .block_on(PostgresBackend::connect(config))
            .map_err(|e| store_error(format!("schema {schema} at {shown}: {e}")))?;
        self.stores.push(Arc::new(AnyStore::Postgres(store)));
        self.infos.push(StoreInfo {
            kind: StoreKind::Postgres,
            location: format!("schema {schema} at {shown}"),
        });
        Ok(())
    }

    /// The runtime every store operation of the run is awaited on.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// The stores, by region.
    pub fn stores(&self) -> Vec<Arc<AnyStore>> {
        self.stores.clone()
    }

    /// What each region runs on, by region.
    pub fn infos(&self) -> Vec<StoreInfo> {
        self.infos.clone()
    }

    /// Closes the stores, drops the schemas and stops the servers this run created. Errors
    /// name whatever could not be removed.
    pub fn stop(mut self) -> Result<(), SimError> {
        self.stopped = true;
        let problems = self.remove_everything();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(store_error(format!(
                "cleaning up the run's stores: {}",
                problems.join("; ")
            )))
        }
    }

    fn remove_everything(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        for store in std::mem::take(&mut self.stores) {
            if let AnyStore::Postgres(pg) = store.as_ref() {
                let closing =
                    async { tokio::time::timeout(Duration::from_secs(10), pg.close()).await };
                if self.runtime.block_on(closing).is_err() {
                    problems.push(format!(
                        "closing the connections of schema {} timed out",
                        pg.schema()
                    ));
                }
            }
        }
        let schemas = std::mem::take(&mut self.schemas);
        if !schemas.is_empty() {
            let dropping = async {
                let dropping = drop_schemas(&self.postgres_url, &schemas);
                tokio::time::timeout(Duration::from_secs(60), dropping).await
            };
            match self.runtime.block_on(dropping) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => problems.push(e),
                Err(_) => problems.push(format!(
                    "dropping the schemas {} timed out",
                    schemas.join(", ")
                )),
            }
        }
        for mut server in std::mem::take(&mut self.redis) {
            if let Err(e) = server.stop() {
                problems.push(e);
            }
        }
        problems
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        // A failed or panicking run: remove what it made, and say what could not be.
        let problems = self.remove_everything();
        if !problems.is_empty() {
            eprintln!(
                "geostate-sim: cleaning up after a failed run: {}",
                problems.join("; ")
            );
        }
    }
}

/// Drops exactly `schemas` (with everything in them) over a connection of its own.
async fn drop_schemas(url: &str, schemas: &[String]) -> Result<(), String> {
    let shown = redact_url(url);
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| format!("connecting to {shown} to drop {}: {e}", schemas.join(", ")))?;
    let lock_timeout = format!("SET lock_timeout = '{DROP_LOCK_TIMEOUT}'");
    let mut problems = Vec::new();
    if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(lock_timeout))
        .execute(&mut conn)
        .await
    {
        problems.push(format!("setting lock_timeout: {e}"));
    }
    for schema in schemas {
        let statement = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
        {
            problems.push(format!("dropping schema {schema}: {e}"));
        }
    }
    let _ = conn.close().await;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}
