//! The region handle: the application's API.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use geostate_backends::{
    BackendError, Expect, Key, LocalWrite, MemoryBackend, Receipt, ScanPage, StateBackend, Stored,
};
use geostate_conflict::{
    resolve, ConflictRecord, FnResolver, KeepSiblings, LwwResolver, ResolvedValue,
    ResolverRegistry, SharedResolver, Sibling,
};
use geostate_crdt::{record, ActorId, Crdt, Hlc, HlcClock, Op, RegisterOp};
use tracing::Instrument;

use crate::{Clock, FromCrdt, RegionConfig, RegionError, RegionId, ResolverPolicy, SystemClock};

/// What a write did.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WriteReceipt {
    /// The key's partition.
    pub partition: u16,
    /// The key's region-local version after the write (for compare-and-set).
    pub version: u64,
    /// The change-feed sequence number, if the write changed anything.
    pub seq: Option<u64>,
    /// The write's hybrid logical clock timestamp.
    pub hlc: Hlc,
}

/// The outcome of a compare-and-set.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CasOutcome {
    /// The version matched and the write was applied.
    Applied(WriteReceipt),
    /// Another version was there; nothing was written.
    Conflict {
        /// The version found (`None`: the key held no value).
        actual: Option<u64>,
    },
}

/// A handle on one region's state. Cheap to clone; clones share everything.
///
/// Writes land in the region's own store at local latency and are acknowledged once the store
/// has committed them (value, change-feed entry and digest together). Reads see this region's
/// state: writes made elsewhere appear once replication has carried them here.
///
/// ```
/// use geostate_crdt::{CounterOp, OrSet, PnCounter, SetOp};
/// use geostate_regions::{Region, RegionConfig};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let gs = Region::connect(RegionConfig::new("us-east".parse().unwrap())).await.unwrap();
/// gs.merge_crdt("cart:42", SetOp::add("sku-1")).await.unwrap();
/// let cart: OrSet<String> = gs.read("cart:42").await.unwrap();
/// assert!(cart.contains(&"sku-1".to_string()));
/// gs.merge_crdt("visits", CounterOp::inc(1)).await.unwrap();
/// assert_eq!(gs.read::<PnCounter>("visits").await.unwrap().value(), 1);
/// // Reading a key as the wrong type is an error, not a silent empty value.
/// assert!(gs.read::<PnCounter>("cart:42").await.is_err());
/// # });
/// ```
#[derive(Debug)]
pub struct Region<B: StateBackend = MemoryBackend> {
    inner: Arc<Inner<B>>,
}

impl<B: StateBackend> Clone for Region<B> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

#[derive(Debug)]
struct Inner<B> {
    id: RegionId,
    actor: ActorId,
    backend: Arc<B>,
    clock: Arc<dyn Clock>,
    hlc: Mutex<HlcClock>,
    resolvers: ResolverRegistry,
    batch_items_max: usize,
    recorded: Mutex<Recorded>,
}

/// Conflicts already appended to the conflict feed by this process (bounded, oldest forgotten
/// first), so a conflict read many times is recorded once.
#[derive(Debug)]
struct Recorded {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    max: usize,
}

impl Recorded {
    /// Remembers `id`; returns whether it was new.
    fn insert(&mut self, id: u64) -> bool {
        if self.max == 0 || !self.seen.insert(id) {
            return self.max == 0;
        }
        self.order.push_back(id);
        while self.order.len() > self.max {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Builds a [`Region`] over any store, with a chosen clock and custom resolvers.
///
/// ```
/// use std::sync::Arc;
/// use geostate_backends::{Layout, MemoryBackend};
/// use geostate_regions::{ManualClock, Region, RegionConfig};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let config = RegionConfig::new("eu-west".parse().unwrap());
/// let store = Arc::new(MemoryBackend::new(Layout::default()));
/// let region = Region::builder(config, store)
///     .clock(ManualClock::new(1_000))
///     .resolver_fn("doc:", "longest", |_key, siblings| {
///         siblings.iter().map(|s| s.value.to_vec()).max_by_key(|v| v.len()).unwrap_or_default()
///     })
///     .build()
///     .unwrap();
/// let receipt = region.put("doc:1", b"hello".to_vec()).await.unwrap();
/// assert_eq!(receipt.hlc.physical_ms(), 1_000);
/// # });
/// ```
pub struct RegionBuilder<B> {
    config: RegionConfig,
    backend: Arc<B>,
    clock: Arc<dyn Clock>,
    custom: Vec<(String, SharedResolver)>,
}

impl<B: std::fmt::Debug> std::fmt::Debug for RegionBuilder<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionBuilder")
            .field("config", &self.config)
            .field("backend", &self.backend)
            .field("clock", &self.clock)
            .field(
                "custom_resolvers",
                &self
                    .custom
                    .iter()
                    .map(|(p, r)| (p, r.name()))
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl<B: StateBackend> RegionBuilder<B> {
    /// Uses `clock` for physical time (the system clock by default).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// Uses `resolver` for opaque values under `prefix` (overrides the configuration's policy
    /// for the same prefix).
    pub fn resolver(mut self, prefix: impl Into<String>, resolver: SharedResolver) -> Self {
        self.custom.push((prefix.into(), resolver));
        self
    }

    /// Uses a deterministic function to resolve siblings under `prefix`. It must return the
    /// same bytes for the same siblings (they are passed sorted by dot) in every region.
    pub fn resolver_fn<F>(self, prefix: impl Into<String>, name: impl Into<String>, f: F) -> Self
    where
        F: Fn(&str, &[Sibling<'_>]) -> Vec<u8> + Send + Sync + 'static,
    {
        self.resolver(prefix, Arc::new(FnResolver::new(name, f)))
    }

    /// Checks the configuration and builds the handle.
    pub fn build(self) -> Result<Region<B>, RegionError> {
        let config = self.config;
        let actor = config.actor()?;
        let layout = config.layout.to_layout()?;
        if &layout != self.backend.layout() {
            return Err(RegionError::Config(format!(
                "the store's layout {:?} differs from the configured {:?}",
                self.backend.layout(),
                layout
            )));
        }
        let mut resolvers = ResolverRegistry::new();
        let mut overridden: HashSet<&str> = HashSet::new();
        for (prefix, _) in &self.custom {
            overridden.insert(prefix);
        }
        for entry in &config.resolvers {
            if overridden.contains(entry.prefix.as_str()) {
                continue;
            }
            let resolver: SharedResolver = match entry.policy {
                ResolverPolicy::Lww => Arc::new(LwwResolver),
                ResolverPolicy::KeepSiblings => Arc::new(KeepSiblings),
            };
            resolvers
                .register(entry.prefix.clone(), resolver)
                .map_err(|e| RegionError::Config(e.to_string()))?;
        }
        for (prefix, resolver) in self.custom {
            resolvers
                .register(prefix, resolver)
                .map_err(|e| RegionError::Config(e.to_string()))?;
        }
        Ok(Region {
            inner: Arc::new(Inner {
                id: config.region,
                actor,
                backend: self.backend,
                clock: self.clock,
                hlc: Mutex::new(HlcClock::new(config.limits.clock_forward_ms_max)),
                resolvers,
                batch_items_max: config.limits.batch_items_max,
                recorded: Mutex::new(Recorded {
                    seen: HashSet::new(),
                    order: VecDeque::new(),
                    max: config.limits.conflicts_remembered_max,
                }),
            }),
        })
    }
}

impl Region<MemoryBackend> {
    /// Opens a region on the embedded memory store (`[store] kind = "memory"`, the default).
    ///
    /// This crate has no store drivers: a configuration naming Redis or PostgreSQL is a
    /// [`RegionError::Config`] here; `geostate::open_region` (the facade crate) opens a region
    /// on whichever store the configuration names.
    pub async fn connect(config: RegionConfig) -> Result<Self, RegionError> {
        match config.store {
            crate::StoreConfig::Memory => {
                let layout = config.layout.to_layout()?;
                Region::builder(config, Arc::new(MemoryBackend::new(layout))).build()
            }
            ref other => Err(RegionError::Config(format!(
                "Region::connect opens only the memory store, and [store] names kind = {:?}; \
                 open it with geostate::open_region",
                other.kind()
            ))),
        }
    }
}

impl<B: StateBackend> Region<B> {
    /// Starts building a region over `backend`.
    pub fn builder(config: RegionConfig, backend: Arc<B>) -> RegionBuilder<B> {
        RegionBuilder {
            config,
            backend,
            clock: Arc::new(SystemClock),
            custom: Vec::new(),
        }
    }

    /// This region's name.
    pub fn id(&self) -> &RegionId {
        &self.inner.id
    }

    /// This process's actor id.
    pub fn actor(&self) -> ActorId {
        self.inner.actor
    }

    /// The region's store.
    pub fn backend(&self) -> &Arc<B> {
        &self.inner.backend
    }

    /// A fresh timestamp for a local event.
    pub fn now(&self) -> Hlc {
        let now_ms = self.inner.clock.now_ms();
        lock(&self.inner.hlc).tick(now_ms)
    }

    /// Folds a timestamp seen from another region into this region's clock; a timestamp too
    /// far ahead is refused (clock-jump protection).
    pub fn observe(&self, remote: Hlc) -> Result<Hlc, RegionError> {
        let now_ms = self.inner.clock.now_ms();
        Ok(lock(&self.inner.hlc).observe(remote, now_ms)?)
    }

    fn error(&self, key: &Key, e: BackendError) -> RegionError {
        match e {
            BackendError::Crdt(geostate_crdt::Error::TypeMismatch { expected, found }) => {
                RegionError::TypeMismatch {
                    key: key.to_string(),
                    expected,
                    found,
                }
            }
            other => RegionError::Backend(other),
        }
    }

    fn receipt(receipt: Receipt, hlc: Hlc) -> WriteReceipt {
        WriteReceipt {
            partition: receipt.partition,
            version: receipt.version,
            seq: receipt.seq,
            hlc,
        }
    }

    fn check_batch(&self, len: usize) -> Result<(), RegionError> {
        if len > self.inner.batch_items_max {
            return Err(RegionError::Backend(BackendError::InvalidArgument(
                format!(
                    "batch of {len} items exceeds the limit of {}",
                    self.inner.batch_items_max
                ),
            )));
        }
        Ok(())
    }

    fn local_write(&self, key: Key, op: Op, expect: Expect) -> LocalWrite {
        LocalWrite {
            key,
            op,
            actor: self.inner.actor,
            hlc: self.now(),
            expect,
        }
    }

    async fn write(&self, key: &str, op: Op, expect: Expect) -> Result<WriteReceipt, RegionError> {
        let key = Key::new(key)?;
        let write = self.local_write(key.clone(), op, expect);
        let hlc = write.hlc;
        match self.inner.backend.apply(write).await {
            Ok(receipt) => Ok(Self::receipt(receipt, hlc)),
            Err(e) => Err(self.error(&key, e)),
        }
    }

    /// Applies a CRDT operation to `key` in this region's store: the operation's delta is
    /// merged atomically and appended to the change feed, from where it replicates to every
    /// region. A key that holds nothing starts as the operation's type; a key holding another
    /// type is [`RegionError::TypeMismatch`].
    pub async fn merge_crdt(
        &self,
        key: &str,
        op: impl Into<Op>,
    ) -> Result<WriteReceipt, RegionError> {
        let span = tracing::debug_span!("merge_crdt", region = %self.inner.id, key);
        self.write(key, op.into(), Expect::Any)
            .instrument(span)
            .await
    }

    /// [`merge_crdt`](Region::merge_crdt) for many keys, each applied atomically, each with its
    /// own outcome.
    pub async fn merge_batch<K, O>(
        &self,
        items: impl IntoIterator<Item = (K, O)>,
    ) -> Result<Vec<Result<WriteReceipt, RegionError>>, RegionError>
    where
        K: AsRef<str>,
        O: Into<Op>,
    {
        let items: Vec<(String, Op, Expect)> = items
            .into_iter()
            .map(|(k, op)| (k.as_ref().to_string(), op.into(), Expect::Any))
            .collect();
        let span =
            tracing::debug_span!("merge_batch", region = %self.inner.id, items = items.len());
        self.apply_batch(items).instrument(span).await
    }

    /// Applies writes each atomically and in order, each with its own outcome: the shared body
    /// of every batch form.
    async fn apply_batch(
        &self,
        items: Vec<(String, Op, Expect)>,
    ) -> Result<Vec<Result<WriteReceipt, RegionError>>, RegionError> {
        self.check_batch(items.len())?;
        let mut results: Vec<Option<Result<WriteReceipt, RegionError>>> = Vec::new();
        let mut writes = Vec::new();
        let mut slots = Vec::new();
        for (i, (key, op, expect)) in items.into_iter().enumerate() {
            results.push(None);
            match Key::new(key) {
                Ok(k) => {
                    writes.push(self.local_write(k, op, expect));
                    slots.push(i);
                }
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        let meta: Vec<(Key, Hlc)> = writes.iter().map(|w| (w.key.clone(), w.hlc)).collect();
        let outcomes = self.inner.backend.apply_many(writes).await?;
        for ((slot, outcome), (key, hlc)) in slots.into_iter().zip(outcomes).zip(meta) {
            results[slot] = Some(match outcome {
                Ok(r) => Ok(Self::receipt(r, hlc)),
                Err(e) => Err(self.error(&key, e)),
            });
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RegionError::Backend(BackendError::Unavailable(
                        "the store returned fewer outcomes than writes".into(),
                    )))
                })
            })
            .collect())
    }

    /// Reads `key` as a `T`. A key that holds nothing reads as `T`'s empty value; a key holding
    /// another type is [`RegionError::TypeMismatch`]; corrupt bytes are
    /// [`BackendError::Corrupt`].
    pub async fn read<T: FromCrdt>(&self, key: &str) -> Result<T, RegionError> {
        Ok(self.read_versioned::<T>(key).await?.0)
    }

    /// Reads `key` as a `T` with its region-local version (`None`: the key holds nothing), for
    /// a following [`compare_and_set`](Region::compare_and_set).
    pub async fn read_versioned<T: FromCrdt>(
        &self,
        key: &str,
    ) -> Result<(T, Option<u64>), RegionError> {
        let span = tracing::debug_span!("read", region = %self.inner.id, key);
        async move {
            let k = Key::new(key)?;
            match self.inner.backend.get(&k).await {
                Ok(None) => Ok((T::empty(key)?, None)),
                Ok(Some(stored)) => Ok((T::from_crdt(key, stored.value)?, Some(stored.version))),
                Err(e) => Err(self.error(&k, e)),
            }
        }
        .instrument(span)
        .await
    }

    /// Reads many keys as `T`, each with its own outcome.
    pub async fn read_many<T: FromCrdt>(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<T, RegionError>>, RegionError> {
        self.check_batch(keys.len())?;
        let mut valid = Vec::new();
        let mut results: Vec<Option<Result<T, RegionError>>> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            results.push(None);
            match Key::new(*key) {
                Ok(k) => valid.push((i, k)),
                Err(e) => results[i] = Some(Err(e.into())),
            }
        }
        let just_keys: Vec<Key> = valid.iter().map(|(_, k)| k.clone()).collect();
        let outcomes = self.inner.backend.get_many(&just_keys).await?;
        for ((i, key), outcome) in valid.into_iter().zip(outcomes) {
            results[i] = Some(match outcome {
                Ok(None) => T::empty(key.as_str()),
                Ok(Some(stored)) => T::from_crdt(key.as_str(), stored.value),
                Err(e) => Err(self.error(&key, e)),
            });
        }
        Ok(results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(RegionError::Backend(BackendError::Unavailable(
                        "the store returned fewer outcomes than keys".into(),
                    )))
                })
            })
            .collect())
    }

    /// The stored value of `key`, whatever its type, with its version.
    pub async fn read_value(&self, key: &str) -> Result<Option<Stored>, RegionError> {
        let k = Key::new(key)?;
        self.inner
            .backend
            .get(&k)
            .await
            .map_err(|e| self.error(&k, e))
    }

    /// Writes an opaque value: a multi-value-register write that replaces every value this
    /// region has seen under `key`. Writes made concurrently elsewhere become siblings, which
    /// [`get`](Region::get) resolves.
    pub async fn put(
        &self,
        key: &str,
        value: impl Into<Vec<u8>>,
    ) -> Result<WriteReceipt, RegionError> {
        let span = tracing::debug_span!("put", region = %self.inner.id, key);
        self.write(key, Op::Mv(RegisterOp::Write(value.into())), Expect::Any)
            .instrument(span)
            .await
    }

    /// [`put`](Region::put) for many keys, each with its own outcome.
    pub async fn put_many<K, V>(
        &self,
        items: impl IntoIterator<Item = (K, V)>,
    ) -> Result<Vec<Result<WriteReceipt, RegionError>>, RegionError>
    where
        K: AsRef<str>,
        V: Into<Vec<u8>>,
    {
        self.merge_batch(
            items
                .into_iter()
                .map(|(k, v)| (k, Op::Mv(RegisterOp::Write(v.into())))),
        )
        .await
    }

    /// Reads an opaque value. Concurrent writes (siblings) are resolved by the resolver of the
    /// longest matching key prefix (last-writer-wins by default); a conflict is appended to the
    /// conflict feed once per process.
    pub async fn get(&self, key: &str) -> Result<ResolvedValue, RegionError> {
        let span = tracing::debug_span!("get", region = %self.inner.id, key);
        async move {
            let k = Key::new(key)?;
            let stored = self
                .inner
                .backend
                .get(&k)
                .await
                .map_err(|e| self.error(&k, e))?;
            self.resolve_stored(&k, stored).await
        }
        .instrument(span)
        .await
    }

    /// [`get`](Region::get) for many keys, each with its own outcome.
    pub async fn get_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<ResolvedValue, RegionError>>, RegionError> {
        self.check_batch(keys.len())?;
        let mut out = Vec::with_capacity(keys.len());
        let mut valid = Vec::new();
        for key in keys {
            match Key::new(*key) {
                Ok(k) => {
                    valid.push(k);
                    out.push(None);
                }
                Err(e) => out.push(Some(Err(RegionError::from(e)))),
            }
        }
        let mut fetched = self.inner.backend.get_many(&valid).await?.into_iter();
        let mut valid = valid.into_iter();
        let mut results = Vec::with_capacity(out.len());
        for slot in out {
            results.push(match slot {
                Some(err) => err,
                None => match (valid.next(), fetched.next()) {
                    (Some(k), Some(Ok(stored))) => self.resolve_stored(&k, stored).await,
                    (Some(k), Some(Err(e))) => Err(self.error(&k, e)),
                    _ => Err(RegionError::Backend(BackendError::Unavailable(
                        "the store returned fewer outcomes than keys".into(),
                    ))),
                },
            });
        }
        Ok(results)
    }

    async fn resolve_stored(
        &self,
        key: &Key,
        stored: Option<Stored>,
    ) -> Result<ResolvedValue, RegionError> {
        let register = match stored.map(|s| s.value) {
            None => return Ok(ResolvedValue::Absent),
            Some(Crdt::MvRegister(r)) => r,
            Some(other) => {
                return Err(RegionError::TypeMismatch {
                    key: key.to_string(),
                    expected: geostate_crdt::TypeTag::MvRegister,
                    found: other.type_tag(),
                })
            }
        };
        let resolved = resolve(&self.inner.resolvers, key.as_str(), &register);
        if let Some(record) = resolved.record {
            let id = conflict_id(&record);
            if lock(&self.inner.recorded).insert(id) {
                let bytes = record::encode(&record)?;
                self.inner.backend.append_conflict(bytes).await?;
                tracing::debug!(region = %self.inner.id, key = key.as_str(), siblings = record.siblings.len(), "conflict recorded");
            }
        }
        Ok(resolved.value)
    }

    /// Deletes `key`: removes every write this region has seen under it, whatever the type. The
    /// removal replicates like any write; a write made concurrently elsewhere survives it.
    pub async fn delete(&self, key: &str) -> Result<WriteReceipt, RegionError> {
        let span = tracing::debug_span!("delete", region = %self.inner.id, key);
        self.write(key, Op::Delete, Expect::Any)
            .instrument(span)
            .await
    }

    /// [`delete`](Region::delete) for many keys, each with its own outcome.
    pub async fn delete_many(
        &self,
        keys: &[&str],
    ) -> Result<Vec<Result<WriteReceipt, RegionError>>, RegionError> {
        self.merge_batch(keys.iter().map(|k| (*k, Op::Delete)))
            .await
    }

    /// Applies `op` only if the key's region-local version is what `expect` says. This is a
    /// strong operation *within this region* only: other regions' concurrent writes still
    /// merge with it when they arrive.
    ///
    /// ```
    /// use geostate_backends::Expect;
    /// use geostate_crdt::{CounterOp, PnCounter};
    /// use geostate_regions::{CasOutcome, Region, RegionConfig};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let gs = Region::connect(RegionConfig::new("us-east".parse().unwrap())).await.unwrap();
    /// let first = gs.compare_and_set("seats", Expect::Absent, CounterOp::inc(10)).await.unwrap();
    /// let CasOutcome::Applied(receipt) = first else { panic!() };
    /// // A writer holding a stale version loses:
    /// gs.merge_crdt("seats", CounterOp::dec(1)).await.unwrap();
    /// let stale = gs.compare_and_set("seats", Expect::Version(receipt.version), CounterOp::dec(5)).await.unwrap();
    /// assert!(matches!(stale, CasOutcome::Conflict { .. }));
    /// assert_eq!(gs.read::<PnCounter>("seats").await.unwrap().value(), 9);
    /// # });
    /// ```
    pub async fn compare_and_set(
        &self,
        key: &str,
        expect: Expect,
        op: impl Into<Op>,
    ) -> Result<CasOutcome, RegionError> {
        let span = tracing::debug_span!("compare_and_set", region = %self.inner.id, key);
        match self.write(key, op.into(), expect).instrument(span).await {
            Ok(receipt) => Ok(CasOutcome::Applied(receipt)),
            Err(RegionError::Backend(BackendError::VersionConflict { actual, .. })) => {
                Ok(CasOutcome::Conflict { actual })
            }
            Err(e) => Err(e),
        }
    }

    /// [`compare_and_set`](Region::compare_and_set) for many keys, each checked and applied
    /// atomically on its own (not all-or-nothing), each with its own outcome.
    pub async fn compare_and_set_batch<K, O>(
        &self,
        items: impl IntoIterator<Item = (K, Expect, O)>,
    ) -> Result<Vec<Result<CasOutcome, RegionError>>, RegionError>
    where
        K: AsRef<str>,
        O: Into<Op>,
    {
        let items: Vec<(String, Op, Expect)> = items
            .into_iter()
            .map(|(k, expect, op)| (k.as_ref().to_string(), op.into(), expect))
            .collect();
        let span = tracing::debug_span!(
            "compare_and_set_batch",
            region = %self.inner.id,
            items = items.len()
        );
        let outcomes = self.apply_batch(items).instrument(span).await?;
        Ok(outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Ok(receipt) => Ok(CasOutcome::Applied(receipt)),
                Err(RegionError::Backend(BackendError::VersionConflict { actual, .. })) => {
                    Ok(CasOutcome::Conflict { actual })
                }
                Err(e) => Err(e),
            })
            .collect())
    }

    /// Keys starting with `prefix` and greater than `after`, in key order, at most `limit`
    /// per page; resume from the page's `next`.
    pub async fn scan(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<ScanPage, RegionError> {
        let after = after.map(Key::new).transpose()?;
        Ok(self
            .inner
            .backend
            .scan(prefix, after.as_ref(), limit)
            .await?)
    }

    /// Conflict records after sequence number `after`, at most `limit`. A record that does not
    /// decode is an error (the feed is never silently skipped).
    pub async fn conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, ConflictRecord)>, RegionError> {
        let raw = self.inner.backend.read_conflicts(after, limit).await?;
        raw.into_iter()
            .map(|(seq, bytes)| Ok((seq, record::decode::<ConflictRecord>(&bytes)?)))
            .collect()
    }
}

/// Identifies a conflict by its key and sibling dots.
fn conflict_id(record: &ConflictRecord) -> u64 {
    let mut bytes = record.key.as_bytes().to_vec();
    for s in &record.siblings {
        bytes.extend_from_slice(&s.dot.actor.get().to_le_bytes());
        bytes.extend_from_slice(&s.dot.counter.to_le_bytes());
    }
    geostate_backends::fnv1a64(&bytes)
}
