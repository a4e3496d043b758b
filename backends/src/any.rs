//! [`AnyStore`]: one type for a region store chosen at run time (from a configuration file,
//! a command-line flag or a simulation scenario).
//!
//! Code generic over [`StateBackend`] is monomorphised per store type; a program that picks
//! its store when it starts needs one concrete type for all of them. `AnyStore` is that type:
//! an enum over the stores of this crate that forwards every operation to the store it holds,
//! so it keeps each store's guarantees exactly. The forwarding costs one `match` per call.
//!
//! ```
//! use geostate_backends::{AnyStore, Layout, MemoryBackend, StateBackend};
//!
//! let store = AnyStore::from(MemoryBackend::new(Layout::default()));
//! assert_eq!(store.kind(), "memory");
//! assert_eq!(store.layout(), &Layout::default());
//! ```

use geostate_crdt::{Crdt, VersionVector};

use crate::postgres::PostgresBackend;
use crate::redis::RedisBackend;
use crate::{
    BackendError, FeedPage, Key, Layout, LocalWrite, MemoryBackend, PartitionDigest, Receipt,
    ScanPage, StateBackend, Stored, TombstonePage,
};

/// A region store of any kind this crate has, chosen at run time. Every [`StateBackend`]
/// operation is forwarded to the store held.
#[derive(Debug)]
#[non_exhaustive]
pub enum AnyStore {
    /// The embedded in-memory store.
    Memory(MemoryBackend),
    /// A Redis store (boxed: it is much larger than the other handles).
    Redis(Box<RedisBackend>),
    /// A PostgreSQL store.
    Postgres(PostgresBackend),
}

impl AnyStore {
    /// `"memory"`, `"redis"` or `"postgres"`: the kind of store held.
    pub fn kind(&self) -> &'static str {
        match self {
            AnyStore::Memory(_) => "memory",
            AnyStore::Redis(_) => "redis",
            AnyStore::Postgres(_) => "postgres",
        }
    }

    /// Releases the store's connections: closes a PostgreSQL store's pools (waiting for
    /// connections in use to come back). Redis connections and the memory store are released
    /// when the store is dropped; for them this does nothing.
    pub async fn close(&self) {
        if let AnyStore::Postgres(store) = self {
            store.close().await;
        }
    }
}

impl From<MemoryBackend> for AnyStore {
    fn from(store: MemoryBackend) -> Self {
        AnyStore::Memory(store)
    }
}

impl From<RedisBackend> for AnyStore {
    fn from(store: RedisBackend) -> Self {
        AnyStore::Redis(Box::new(store))
    }
}

impl From<PostgresBackend> for AnyStore {
    fn from(store: PostgresBackend) -> Self {
        AnyStore::Postgres(store)
    }
}

/// `$call` (an expression over `$store`) on whichever store `$self` holds, awaited.
macro_rules! forward {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Memory($store) => $call.await,
            AnyStore::Redis($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
        }
    };
}

impl StateBackend for AnyStore {
    fn layout(&self) -> &Layout {
        match self {
            AnyStore::Memory(s) => s.layout(),
            AnyStore::Redis(s) => s.layout(),
            AnyStore::Postgres(s) => s.layout(),
        }
    }

    async fn get(&self, key: &Key) -> Result<Option<Stored>, BackendError> {
        forward!(self, s => s.get(key))
    }

    async fn get_many(
        &self,
        keys: &[Key],
    ) -> Result<Vec<Result<Option<Stored>, BackendError>>, BackendError> {
        forward!(self, s => s.get_many(keys))
    }

    async fn apply(&self, write: LocalWrite) -> Result<Receipt, BackendError> {
        forward!(self, s => s.apply(write))
    }

    async fn apply_many(
        &self,
        writes: Vec<LocalWrite>,
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        forward!(self, s => s.apply_many(writes))
    }

    async fn merge(&self, key: &Key, delta: &Crdt) -> Result<Receipt, BackendError> {
        forward!(self, s => s.merge(key, delta))
    }

    async fn merge_many(
        &self,
        items: &[(Key, Crdt)],
    ) -> Result<Vec<Result<Receipt, BackendError>>, BackendError> {
        forward!(self, s => s.merge_many(items))
    }

    async fn delete(&self, key: &Key) -> Result<bool, BackendError> {
        forward!(self, s => s.delete(key))
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<Vec<bool>, BackendError> {
        forward!(self, s => s.delete_many(keys))
    }

    async fn tombstones(
        &self,
        partition: u16,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<TombstonePage, BackendError> {
        forward!(self, s => s.tombstones(partition, after, limit))
    }

    async fn purge(&self, key: &Key, version: u64) -> Result<bool, BackendError> {
        forward!(self, s => s.purge(key, version))
    }

    async fn dot_floor(&self, partition: u16) -> Result<VersionVector, BackendError> {
        forward!(self, s => s.dot_floor(partition))
    }

    async fn scan(
        &self,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<ScanPage, BackendError> {
        forward!(self, s => s.scan(prefix, after, limit))
    }

    async fn read_feed(
        &self,
        partition: u16,
        after: u64,
        limit: usize,
    ) -> Result<FeedPage, BackendError> {
        forward!(self, s => s.read_feed(partition, after, limit))
    }

    async fn trim_feed(&self, partition: u16, through: u64) -> Result<usize, BackendError> {
        forward!(self, s => s.trim_feed(partition, through))
    }

    async fn digest(&self, partition: u16) -> Result<PartitionDigest, BackendError> {
        forward!(self, s => s.digest(partition))
    }

    async fn bucket_entries(
        &self,
        partition: u16,
        bucket: u16,
    ) -> Result<Vec<(Key, u64)>, BackendError> {
        forward!(self, s => s.bucket_entries(partition, bucket))
    }

    async fn cursor(&self, origin: &str, partition: u16) -> Result<u64, BackendError> {
        forward!(self, s => s.cursor(origin, partition))
    }

    async fn advance_cursor(
        &self,
        origin: &str,
        partition: u16,
        seq: u64,
    ) -> Result<u64, BackendError> {
        forward!(self, s => s.advance_cursor(origin, partition, seq))
    }

    async fn append_conflict(&self, record: Vec<u8>) -> Result<u64, BackendError> {
        forward!(self, s => s.append_conflict(record))
    }

    async fn read_conflicts(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, BackendError> {
        forward!(self, s => s.read_conflicts(after, limit))
    }
}
