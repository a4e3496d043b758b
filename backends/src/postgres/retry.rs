//! What a failed attempt means: retry it, or report it.

use std::sync::Mutex;
use std::time::Duration;

use sqlx::error::Error as SqlxError;

use crate::BackendError;

/// Why an attempt may be retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RetryKind {
    /// Serialization failure, deadlock, or a lost race to create a key: the transaction was
    /// rolled back; the connection is fine.
    Conflict,
    /// The connection failed before the transaction could have committed: drop the
    /// connection and try on another.
    Connection,
    /// An optimistic write's compare-and-set changed nothing: the key or the partition's dot
    /// floor changed since the state it was computed from was read. Retried at once from a
    /// fresh read (or by the locking transaction).
    Race,
}

/// The outcome of a failed attempt.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Nothing took effect; try again (bounded).
    Retry { kind: RetryKind, error: String },
    /// Report this.
    Fail(BackendError),
}

impl From<BackendError> for Attempt {
    fn from(e: BackendError) -> Self {
        Attempt::Fail(e)
    }
}

/// The constraint whose violation means "another writer created the key first".
const VALUES_PKEY: &str = "gs_values_pkey";

/// SQLSTATEs after which the transaction is known to have been rolled back and a retry is
/// safe and likely to succeed.
fn is_conflict(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

/// SQLSTATEs saying the server is going away or not accepting work yet.
fn is_connection(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300")
}

/// Classifies an error of a statement sent before `COMMIT`: nothing has been committed.
pub(crate) fn before_commit(e: SqlxError) -> Attempt {
    match &e {
        SqlxError::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_conflict(&code) {
                Attempt::Retry {
                    kind: RetryKind::Conflict,
                    error: db.message().to_string(),
                }
            } else if code == "23505" && db.constraint() == Some(VALUES_PKEY) {
                Attempt::Retry {
                    kind: RetryKind::Conflict,
                    error: "another writer created the key first".to_string(),
                }
            } else if is_connection(&code) {
                Attempt::Retry {
                    kind: RetryKind::Connection,
                    error: format!("{code}: {}", db.message()),
                }
            } else {
                Attempt::Fail(unavailable_db(&code, db.message()))
            }
        }
        SqlxError::Tls(_) | SqlxError::Io(_) if tls_failure(&e).is_some() => {
            Attempt::Fail(tls_failure(&e).unwrap_or_else(|| BackendError::Tls(e.to_string())))
        }
        SqlxError::Io(_) | SqlxError::Tls(_) | SqlxError::Protocol(_) => Attempt::Retry {
            kind: RetryKind::Connection,
            error: e.to_string(),
        },
        SqlxError::PoolTimedOut => Attempt::Fail(BackendError::Unavailable(
            "no PostgreSQL connection became available within the acquire timeout".into(),
        )),
        SqlxError::PoolClosed => Attempt::Fail(BackendError::Unavailable(
            "the connection pool is closed".into(),
        )),
        _ => Attempt::Fail(BackendError::Unavailable(format!("PostgreSQL: {e}"))),
    }
}

/// Whether a failed statement that commits by itself (autocommit) may nevertheless have
/// committed: the connection failed before its answer came, or the answer says the connection
/// is going away. Any other answer of the server is definite: the statement and its implicit
/// transaction were rolled back.
pub(crate) fn outcome_unknown(e: &SqlxError) -> bool {
    match e {
        SqlxError::Database(db) => {
            is_connection(&db.code().map(|c| c.into_owned()).unwrap_or_default())
        }
        _ => true,
    }
}

/// What a caller is told when a write's outcome is unknown.
pub(crate) fn unknown_outcome(e: &SqlxError) -> BackendError {
    BackendError::Unavailable(format!(
        "the connection failed while the write's statement was in flight ({e}); the write may \
         or may not have taken effect"
    ))
}

/// Classifies an error of the single autocommit statement of an optimistic local write: a
/// definite answer as [`before_commit`] does; an unknown outcome is reported, never retried.
pub(crate) fn autocommit_write(e: SqlxError) -> Attempt {
    if outcome_unknown(&e) {
        Attempt::Fail(unknown_outcome(&e))
    } else {
        before_commit(e)
    }
}

/// Classifies an error of `COMMIT`. A server's answer is definite (the transaction rolled
/// back); a broken connection leaves the outcome unknown, which is never retried.
pub(crate) fn at_commit(e: SqlxError) -> Attempt {
    match &e {
        SqlxError::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            if is_conflict(&code) {
                Attempt::Retry {
                    kind: RetryKind::Conflict,
                    error: db.message().to_string(),
                }
            } else {
                Attempt::Fail(unavailable_db(&code, db.message()))
            }
        }
        _ => Attempt::Fail(BackendError::Unavailable(format!(
            "the connection failed during COMMIT ({e}); the write may or may not have taken \
             effect"
        ))),
    }
}

fn unavailable_db(code: &str, message: &str) -> BackendError {
    BackendError::Unavailable(format!("PostgreSQL error {code}: {message}"))
}

/// SplitMix64: the store's only source of randomness, seeded from the configuration.
#[derive(Debug)]
pub(crate) struct Rng(Mutex<u64>);

impl Rng {
    pub fn new(seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            nanos ^ (u64::from(std::process::id()) << 32)
        });
        Self(Mutex::new(seed))
    }

    pub fn next_u64(&self) -> u64 {
        let mut state = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration between half of `ceiling` and all of it.
    pub fn jitter(&self, ceiling: Duration) -> Duration {
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        let half = nanos / 2;
        Duration::from_nanos(half + self.below(nanos - half + 1))
    }
}

/// [`BackendError::Tls`] when `e` is a TLS failure (the server refused TLS, its certificate is
/// not trusted or does not name the host, a certificate file is unreadable), else `None`.
/// Not retried: it fails the same way until the configuration or the certificate changes.
pub(crate) fn tls_failure(e: &SqlxError) -> Option<BackendError> {
    match e {
        SqlxError::Tls(inner) => Some(BackendError::Tls(format!("PostgreSQL: {inner}"))),
        _ => crate::secure::tls_cause(e)
            .map(|cause| BackendError::Tls(format!("PostgreSQL: {cause}"))),
    }
}
