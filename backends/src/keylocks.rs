//! Per-key async locks of one process: writers of the same key queue behind each other
//! instead of racing through the store; writers of different keys never wait for each other.
//!
//! A table holds an entry only for keys locked or waited for right now, so it stays as small
//! as the writes in flight. (A fixed array of lock stripes would be simpler, but it makes
//! unrelated keys share locks: with group commit two batches of a few dozen keys each share
//! a stripe most of the time, and the second waits a whole round trip for the first. Measured
//! with 1,024 stripes and 50 tasks on Redis: 20% fewer merges per second than without locks.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::OwnedMutexGuard;

use crate::Key;

type Lock = Arc<tokio::sync::Mutex<()>>;

/// The lock table.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    held: Mutex<HashMap<String, Lock>>,
}

/// One key locked; unlocks (and forgets the key when nobody else waits for it) when dropped.
#[derive(Debug)]
pub(crate) struct KeyGuard<'a> {
    table: &'a KeyLocks,
    key: String,
    guard: Option<OwnedMutexGuard<()>>,
}

impl KeyLocks {
    fn table(&self) -> MutexGuard<'_, HashMap<String, Lock>> {
        // A panic while the table is locked leaves it consistent (one insert or remove).
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Locks `keys` (each once), in key order so that two callers never wait for each other
    /// in a cycle.
    pub(crate) async fn lock(&self, keys: &[&Key]) -> Vec<KeyGuard<'_>> {
        let mut keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut guards = Vec::with_capacity(keys.len());
        for key in keys {
            let lock = Arc::clone(self.table().entry(key.to_string()).or_default());
            guards.push(KeyGuard {
                table: self,
                key: key.to_string(),
                guard: Some(lock.lock_owned().await),
            });
        }
        guards
    }
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        let mut table = self.table.table();
        drop(self.guard.take());
        // Only the table holds the lock now: nobody holds or waits for it.
        if table
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            table.remove(&self.key);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn key(s: &str) -> Key {
        Key::new(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test]
    async fn a_key_waits_for_its_holder_and_the_table_empties() {
        let locks = Arc::new(KeyLocks::default());
        let (a, b) = (key("a"), key("b"));
        let first = locks.lock(&[&b, &a, &a]).await;
        assert_eq!(first.len(), 2, "each key once");
        // Another key is free at once.
        drop(locks.lock(&[&key("c")]).await);
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move { locks.lock(&[&key("a")]).await.len() })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a is held");
        drop(first);
        assert_eq!(waiter.await.unwrap_or(0), 1);
        assert!(locks.table().is_empty(), "nothing held, nothing kept");
    }
}
