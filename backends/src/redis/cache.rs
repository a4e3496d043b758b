//! The write cache: what this process last committed to each recently written key.
//!
//! A local write to a key this process committed a moment ago need not read the key again:
//! the cache holds the value it wrote (decoded), the meta the commit recorded and the
//! envelope's length and checksum, which is everything the write script checks. So such a
//! write is one round trip (the commit) instead of two (read, then commit). The cache is only
//! ever an optimisation: the commit still checks that the key holds exactly what the cache
//! says, so an entry made stale by another process costs one lost race and a fresh read,
//! never a wrong result. Reads never come from the cache (they must see other processes'
//! writes).
//!
//! Bounded by entries and by the bytes of the cached envelopes; least recently used entries
//! go first.

use std::sync::{Arc, Mutex, MutexGuard};

use hashlink::LruCache;

use crate::Key;

/// A bounded least-recently-used map from keys to shared entries, each with a weight (bytes).
pub(crate) struct WriteCache<V> {
    inner: Mutex<Inner<V>>,
    entries_max: usize,
    bytes_max: usize,
}

struct Inner<V> {
    map: LruCache<Key, (Arc<V>, usize)>,
    bytes: usize,
}

impl<V> WriteCache<V> {
    /// A cache of at most `entries_max` entries weighing at most `bytes_max` together
    /// (`entries_max` 0: nothing is ever cached).
    pub(crate) fn new(entries_max: usize, bytes_max: usize) -> Self {
        Self {
            inner: Mutex::new(Inner {
                map: LruCache::new_unbounded(),
                bytes: 0,
            }),
            entries_max,
            bytes_max,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner<V>> {
        // A panic while holding the lock cannot leave the map inconsistent (every change is
        // one call into it), so a poisoned lock is used as is.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry of `key`, now the most recently used.
    pub(crate) fn get(&self, key: &Key) -> Option<Arc<V>> {
        if self.entries_max == 0 {
            return None;
        }
        self.lock().map.get(key).map(|(v, _)| Arc::clone(v))
    }

    /// Sets the entry of `key`, then drops least recently used entries until the bounds
    /// hold. An entry heavier than the whole byte bound is not kept (any older entry of the
    /// key is dropped).
    pub(crate) fn insert(&self, key: Key, value: V, weight: usize) {
        if self.entries_max == 0 {
            return;
        }
        let mut inner = self.lock();
        if let Some((_, old)) = inner.map.remove(&key) {
            inner.bytes -= old;
        }
        if weight > self.bytes_max {
            return;
        }
        inner.map.insert(key, (Arc::new(value), weight));
        inner.bytes += weight;
        while inner.map.len() > self.entries_max || inner.bytes > self.bytes_max {
            match inner.map.remove_lru() {
                Some((_, (_, w))) => inner.bytes -= w,
                None => break,
            }
        }
    }

    /// Forgets the entry of `key`, if any.
    pub(crate) fn remove(&self, key: &Key) {
        if self.entries_max == 0 {
            return;
        }
        let mut inner = self.lock();
        if let Some((_, w)) = inner.map.remove(key) {
            inner.bytes -= w;
        }
    }

    /// Forgets every entry.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.map.clear();
        inner.bytes = 0;
    }

    /// Entries held and their total weight.
    #[cfg(test)]
    fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        Key::new(format!("k{i}")).unwrap()
    }

    #[test]
    fn least_recently_used_entries_go_first_when_entries_overflow() {
        let cache = WriteCache::new(3, 1_000);
        for i in 0..3 {
            cache.insert(key(i), i, 10);
        }
        assert_eq!(cache.get(&key(0)).as_deref(), Some(&0)); // 0 is now the newest
        cache.insert(key(3), 3, 10);
        assert_eq!(cache.get(&key(1)), None);
        assert_eq!(cache.get(&key(0)).as_deref(), Some(&0));
        assert_eq!(cache.usage(), (3, 30));
    }

    #[test]
    fn the_byte_bound_holds_and_an_overweight_entry_is_not_kept() {
        let cache = WriteCache::new(100, 100);
        cache.insert(key(0), 0, 60);
        cache.insert(key(1), 1, 60);
        assert_eq!(cache.get(&key(0)), None);
        assert_eq!(cache.usage(), (1, 60));
        // Replacing an entry re-weighs it; one heavier than the bound drops the old one.
        cache.insert(key(1), 11, 30);
        assert_eq!(cache.usage(), (1, 30));
        cache.insert(key(1), 12, 101);
        assert_eq!(cache.get(&key(1)), None);
        assert_eq!(cache.usage(), (0, 0));
    }

    #[test]
    fn removal_clear_and_a_disabled_cache() {
        let cache = WriteCache::new(10, 100);
        cache.insert(key(0), 0, 5);
        cache.insert(key(1), 1, 5);
        cache.remove(&key(0));
        assert_eq!(cache.usage(), (1, 5));
        cache.clear();
        assert_eq!(cache.usage(), (0, 0));
        let off = WriteCache::new(0, 100);
        off.insert(key(0), 0, 5);
        assert_eq!(off.get(&key(0)), None);
    }
}
