//! Group commit: single writes that arrive while others are in flight ride one wave.
//!
//! A write that finds the store idle runs at once in its caller's task, as before. A write
//! that arrives while another is in flight joins a queue; up to [`DRAINERS_MAX`] tasks drain
//! it, each taking everything queued (at most [`BATCH_MAX`] writes) and running it as one
//! batch: one pipelined read of the keys not in the write cache and one write script call
//! per 64 commits instead of one per write. That spreads the fixed costs of a request (the
//! client's request machinery, the server's script call) over the writes that queued while
//! the previous request was on the wire.
//!
//! The draining tasks are spawned and own the batch, so a caller that gives up (a dropped
//! future, a timeout) never abandons the writes of the others that rode with it. Its own
//! write may still be committed after it gave up, as with any request already sent.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Item, Store};
use crate::{BackendError, Receipt};

/// Most tasks draining the queue at once (the pipelining depth of grouped writes).
const DRAINERS_MAX: usize = 4;
/// Most writes one draining task takes at once.
const BATCH_MAX: usize = 256;

type Reply = oneshot::Sender<Result<Receipt, BackendError>>;

/// The queue of writes waiting for a draining task.
#[derive(Default)]
pub(crate) struct Queue {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    waiting: VecDeque<(Item, Reply)>,
    /// Writes running in their caller's task plus draining tasks.
    running: usize,
}

/// What [`Queue::enter`] decided.
enum Entry {
    /// The store is idle: run the write in the caller's task.
    Alone(Item),
    /// Queued; `spawn`: start a draining task.
    Queued { spawn: bool },
}

impl Queue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while the lock is held cannot leave the state inconsistent (every update
        // is one push, pop or counter step).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter(&self, item: Item, reply: Reply) -> Entry {
        let mut state = self.lock();
        if state.running == 0 && state.waiting.is_empty() {
            state.running = 1;
            return Entry::Alone(item);
        }
        state.waiting.push_back((item, reply));
        let spawn = state.running < DRAINERS_MAX;
        if spawn {
            state.running += 1;
        }
        Entry::Queued { spawn }
    }

    /// The next batch for a draining task; `None` (and the task counted out) when the queue
    /// is empty.
    fn next_batch(&self) -> Option<Vec<(Item, Reply)>> {
        let mut state = self.lock();
        if state.waiting.is_empty() {
            state.running -= 1;
            return None;
        }
        let n = state.waiting.len().min(BATCH_MAX);
        Some(state.waiting.drain(..n).collect())
    }

    /// A write that ran in its caller's task is done (or was dropped); returns whether a
    /// draining task must be started for writes that queued behind it.
    fn leave_alone(&self) -> bool {
        let mut state = self.lock();
        state.running -= 1;
        let spawn = !state.waiting.is_empty() && state.running < DRAINERS_MAX;
        if spawn {
            state.running += 1;
        }
        spawn
    }
}

/// Counts a write that ran in its caller's task out when it ends, even by being dropped.
struct Alone<'a>(&'a Arc<Store>);

impl Drop for Alone<'_> {
    fn drop(&mut self) {
        if self.0.queue.leave_alone() {
            spawn_drainer(self.0);
        }
    }
}

fn spawn_drainer(store: &Arc<Store>) {
    let store = Arc::clone(store);
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(drain(store));
        }
        // No runtime (a handle dropped outside one): nobody can run the queued writes; their
        // callers, if still waiting, are told so when the queue drops their reply senders.
        Err(_) => {
            let mut state = store.queue.lock();
            state.running -= 1;
            state.waiting.clear();
        }
    }
}

async fn drain(store: Arc<Store>) {
    while let Some(batch) = store.queue.next_batch() {
        let (items, replies): (Vec<Item>, Vec<Reply>) = batch.into_iter().unzip();
        let outcomes = store.execute(items).await;
        for (reply, outcome) in replies.into_iter().zip(outcomes) {
            // A caller that gave up no longer listens.
            let _ = reply.send(outcome);
        }
    }
}

/// Runs one write, grouped with the writes in flight (see the module docs).
pub(crate) async fn write(store: &Arc<Store>, item: Item) -> Result<Receipt, BackendError> {
    let (reply, outcome) = oneshot::channel();
    match store.queue.enter(item, reply) {
        Entry::Alone(item) => {
            let _alone = Alone(store);
            store
                .execute(vec![item])
                .await
                .pop()
                .unwrap_or_else(|| Err(BackendError::Unavailable("internal: no outcome".into())))
        }
        Entry::Queued { spawn } => {
            store
                .conn
                .counters
                .grouped_writes
                .fetch_add(1, Ordering::Relaxed);
            if spawn {
                spawn_drainer(store);
            }
            outcome.await.unwrap_or_else(|_| {
                Err(BackendError::Unavailable(
                    "the task committing this write stopped (its runtime shut down); the \
                     write may or may not have taken effect"
                        .into(),
                ))
            })
        }
    }
}
