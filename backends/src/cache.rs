//! A bounded, per-process cache of what a store last read or wrote for a key.
//!
//! Stores whose writes are optimistic (compute the new value from a snapshot, then commit it
//! on the condition that the key still holds the snapshot's version) use it to skip the read:
//! a write whose key is cached is computed from the cached snapshot and committed at once. The
//! cache is **only an optimisation**: the commit's version condition is what makes the write
//! correct, so a stale entry costs a failed commit and a fresh read, never a wrong result.
//! Whoever uses it must therefore
//!
//! - never answer a caller from a cached snapshot alone (a no-op, an error, a failed
//!   compare-and-set condition computed from a cached snapshot must be confirmed on a fresh
//!   read), only commit conditional writes computed from it;
//! - remove an entry whose commit failed, and every key it deletes, purges or overwrites
//!   outside the cached path (stale entries are merely wasteful, but they are waste).
//!
//! [`SnapshotCache`] is generic over the snapshot type `S` (the PostgreSQL store caches a
//! decoded value with its digest contribution and the writer's dot floor). Each entry is a
//! version and an `Arc<S>` (handing one out copies nothing) weighing as many bytes as its
//! inserter says. The cache keeps at most [`entries_max`](SnapshotCache::entries_max)
//! entries of at most [`bytes_max`](SnapshotCache::bytes_max) bytes in total, forgetting the
//! least recently used first; an entry heavier than the whole budget is not kept. A version
//! never goes back: inserting an older version of a key than the one cached keeps the newer
//! one (two tasks that read a key at different times may insert in either order).
//!
//! ```
//! use std::sync::Arc;
//! use geostate_backends::cache::SnapshotCache;
//!
//! let cache: SnapshotCache<String> = SnapshotCache::new(2, 1_000);
//! cache.insert("a", 7, Arc::new("seven".into()), 5);
//! cache.insert("b", 3, Arc::new("three".into()), 5);
//! assert_eq!(cache.get("a").map(|(v, s)| (v, s.to_string())), Some((7, "seven".into())));
//! cache.insert("c", 1, Arc::new("one".into()), 3); // forgets "b", the least recently used
//! assert!(cache.get("b").is_none());
//! cache.insert("a", 6, Arc::new("six".into()), 3); // older than what is cached: ignored
//! assert_eq!(cache.get("a").map(|(v, _)| v), Some(7));
//! cache.remove("a");
//! assert!(cache.get("a").is_none());
//! ```

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use hashlink::LruCache;

/// Bytes an entry is charged beyond what its inserter says: the key, the version and the
/// bookkeeping of the map.
pub const ENTRY_OVERHEAD_BYTES: usize = 64;

/// Counters of a [`SnapshotCache`] since it was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that found none.
    pub misses: u64,
    /// Entries forgotten to stay within the bounds.
    pub evictions: u64,
    /// Entries removed because they were found stale or their key was removed.
    pub invalidations: u64,
    /// Entries held now.
    pub entries: u64,
    /// Bytes held now (as charged: the inserters' weights plus the per-entry overhead).
    pub bytes: u64,
}

struct Entry<S> {
    version: u64,
    snapshot: Arc<S>,
    bytes: usize,
}

struct Inner<S> {
    map: LruCache<String, Entry<S>>,
    bytes: usize,
}

/// A bounded least-recently-used map from key to `(version, snapshot)`; see the
/// [module documentation](self). Safe to share between tasks (one short mutex section per
/// call, never held across an await).
pub struct SnapshotCache<S> {
    inner: Mutex<Inner<S>>,
    entries_max: usize,
    bytes_max: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
}

impl<S> std::fmt::Debug for SnapshotCache<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache")
            .field("entries_max", &self.entries_max)
            .field("bytes_max", &self.bytes_max)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S> SnapshotCache<S> {
    /// A cache of at most `entries_max` entries and `bytes_max` bytes. Either bound 0 makes a
    /// cache that keeps nothing (every lookup misses).
    pub fn new(entries_max: usize, bytes_max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                // The map's own bound is the entry count; the byte bound is enforced here.
                map: LruCache::new(entries_max.max(1)),
                bytes: 0,
            }),
            entries_max,
            bytes_max,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
        }
    }

    /// The entry bound.
    pub fn entries_max(&self) -> usize {
        self.entries_max
    }

    /// The byte bound.
    pub fn bytes_max(&self) -> usize {
        self.bytes_max
    }

    fn lock(&self) -> MutexGuard<'_, Inner<S>> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters: at worst the byte count is off until entries are removed.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disabled(&self) -> bool {
        self.entries_max == 0 || self.bytes_max == 0
    }

    /// The cached version and snapshot of `key`, marking it recently used.
    pub fn get(&self, key: &str) -> Option<(u64, Arc<S>)> {
        let found = if self.disabled() {
            None
        } else {
            self.lock()
                .map
                .get(key)
                .map(|e| (e.version, Arc::clone(&e.snapshot)))
        };
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Relaxed);
        found
    }

    /// Whether `key` is cached (neither counted as a lookup nor marking it used).
    pub fn contains(&self, key: &str) -> bool {
        !self.disabled() && self.lock().map.contains_key(key)
    }

    /// Caches `snapshot` as `key`'s state at `version`, charged `weight` bytes (plus
    /// [`ENTRY_OVERHEAD_BYTES`]), unless a newer version of `key` is cached or the entry alone
    /// exceeds the byte bound. Forgets least recently used entries to stay within the bounds.
    pub fn insert(&self, key: &str, version: u64, snapshot: Arc<S>, weight: usize) {
        if self.disabled() {
            return;
        }
        let bytes = weight
            .saturating_add(key.len())
            .saturating_add(ENTRY_OVERHEAD_BYTES);
        let mut inner = self.lock();
        if let Some(existing) = inner.map.peek(key) {
            if existing.version > version {
                return;
            }
        }
        if let Some(old) = inner.map.remove(key) {
            inner.bytes -= old.bytes;
        }
        if bytes > self.bytes_max {
            return;
        }
        let mut evicted = 0;
        while inner.map.len() >= self.entries_max || inner.bytes + bytes > self.bytes_max {
            match inner.map.remove_lru() {
                Some((_, old)) => {
                    inner.bytes -= old.bytes;
                    evicted += 1;
                }
                None => break,
            }
        }
        inner.bytes += bytes;
        inner.map.insert(
            key.to_string(),
            Entry {
                version,
                snapshot,
                bytes,
            },
        );
        drop(inner);
        if evicted > 0 {
            self.evictions.fetch_add(evicted, Relaxed);
        }
    }

    /// Forgets `key` (its entry was found stale, or the key was removed or written outside
    /// the cached path).
    pub fn remove(&self, key: &str) {
        if self.disabled() {
            return;
        }
        let mut inner = self.lock();
        if let Some(old) = inner.map.remove(key) {
            inner.bytes -= old.bytes;
            drop(inner);
            self.invalidations.fetch_add(1, Relaxed);
        }
    }

    /// Forgets every entry.
    pub fn clear(&self) {
        let mut inner = self.lock();
        let n = inner.map.len() as u64;
        inner.map.clear();
        inner.bytes = 0;
        drop(inner);
        self.invalidations.fetch_add(n, Relaxed);
    }

    /// Counters and current size.
    pub fn stats(&self) -> CacheStats {
        let (entries, bytes) = {
            let inner = self.lock();
            (inner.map.len() as u64, inner.bytes as u64)
        };
        CacheStats {
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            entries,
            bytes,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn put(cache: &SnapshotCache<u32>, key: &str, version: u64, weight: usize) {
        cache.insert(key, version, Arc::new(version as u32), weight);
    }

    #[test]
    fn entry_bound_forgets_least_recently_used() {
        let cache = SnapshotCache::new(3, usize::MAX);
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            put(&cache, key, i as u64 + 1, 1);
        }
        assert!(cache.get("a").is_some()); // "b" is now the least recently used
        put(&cache, "d", 4, 1);
        assert!(cache.get("b").is_none());
        for key in ["a", "c", "d"] {
            assert!(cache.get(key).is_some(), "{key}");
        }
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.evictions), (3, 1));
        for i in 0..100 {
            put(&cache, &format!("k{i}"), 1, 1);
            assert!(cache.stats().entries <= 3);
        }
    }

    #[test]
    fn byte_bound_is_respected() {
        let per = 100 + 2 + ENTRY_OVERHEAD_BYTES;
        let cache = SnapshotCache::new(1_000, 3 * per);
        for i in 0..10 {
            put(&cache, &format!("k{i}"), 1, 100);
            assert!(cache.stats().bytes as usize <= 3 * per);
        }
        assert_eq!(cache.stats().entries, 3);
        assert!(cache.get("k9").is_some() && cache.get("k6").is_none());
        // An entry heavier than the budget is not kept, and does not evict the others.
        put(&cache, "huge", 1, 10 * per);
        assert!(cache.get("huge").is_none());
        assert_eq!(cache.stats().entries, 3);
        // Replacing an entry recharges it.
        put(&cache, "k9", 2, 10);
        let stats = cache.stats();
        assert_eq!(
            stats.bytes as usize,
            2 * per + 10 + 2 + ENTRY_OVERHEAD_BYTES
        );
    }

    #[test]
    fn versions_never_go_back() {
        let cache = SnapshotCache::new(10, 10_000);
        put(&cache, "k", 5, 1);
        put(&cache, "k", 3, 1);
        assert_eq!(cache.get("k").map(|(v, s)| (v, *s)), Some((5, 5)));
        put(&cache, "k", 9, 1);
        assert_eq!(cache.get("k").map(|(v, _)| v), Some(9));
        // After a removal any version may be cached again.
        cache.remove("k");
        put(&cache, "k", 2, 1);
        assert_eq!(cache.get("k").map(|(v, _)| v), Some(2));
    }

    #[test]
    fn removal_and_clearing_release_bytes() {
        let cache = SnapshotCache::new(10, 10_000);
        put(&cache, "a", 1, 50);
        put(&cache, "b", 1, 50);
        cache.remove("a");
        cache.remove("missing");
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.invalidations), (1, 1));
        assert_eq!(stats.bytes as usize, 50 + 1 + ENTRY_OVERHEAD_BYTES);
        cache.clear();
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes, stats.invalidations), (0, 0, 2));
    }

    #[test]
    fn a_zero_bound_keeps_nothing() {
        for cache in [SnapshotCache::new(0, 1_000), SnapshotCache::new(10, 0)] {
            put(&cache, "a", 1, 1);
            assert!(cache.get("a").is_none());
            let stats = cache.stats();
            assert_eq!((stats.entries, stats.hits, stats.misses), (0, 0, 1));
        }
    }

    #[test]
    fn hits_and_misses_are_counted() {
        let cache = SnapshotCache::new(10, 10_000);
        put(&cache, "a", 1, 1);
        assert!(cache.get("a").is_some());
        assert!(cache.get("b").is_none());
        assert!(cache.get("a").is_some());
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses), (2, 1));
    }

    #[test]
    fn shared_between_threads() {
        let cache = Arc::new(SnapshotCache::new(64, 64 * 200));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let cache = Arc::clone(&cache);
                std::thread::spawn(move || {
                    for i in 0..1_000u64 {
                        let key = format!("k{}", (i * 7 + t) % 100);
                        cache.insert(&key, i, Arc::new(i as u32), 10);
                        if let Some((v, s)) = cache.get(&key) {
                            assert_eq!(v, u64::from(*s));
                        }
                        if i % 13 == 0 {
                            cache.remove(&key);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a cache thread");
        }
        let stats = cache.stats();
        assert!(stats.entries <= 64 && stats.bytes <= 64 * 200);
    }
}
