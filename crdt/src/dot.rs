//! Actors and dots: the identities of writers and of the events they make.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A writer identity: one per writing process (region + node), compact so that it costs eight
/// bytes in every dot and version-vector entry.
///
/// The region layer decides how region and node map onto the number; the CRDT core only needs
/// actors to be distinct and totally ordered (the order breaks LWW ties).
///
/// ```
/// use geostate_crdt::ActorId;
/// let a = ActorId::new(7);
/// assert_eq!(a.get(), 7);
/// assert!(ActorId::new(1) < a);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ActorId(u64);

impl ActorId {
    /// Wraps a raw actor number.
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    /// The raw actor number.
    pub const fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ActorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "actor-{}", self.0)
    }
}

/// One event: the `counter`-th event made by `actor`. Counters start at 1.
///
/// ```
/// use geostate_crdt::{ActorId, Dot};
/// let d = Dot::new(ActorId::new(1), 3);
/// assert_eq!(d.to_string(), "actor-1:3");
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Dot {
    /// Who made the event.
    pub actor: ActorId,
    /// The event's position in that actor's sequence, starting at 1.
    pub counter: u64,
}

impl Dot {
    /// A dot for `actor`'s `counter`-th event.
    pub const fn new(actor: ActorId, counter: u64) -> Self {
        Self { actor, counter }
    }
}

impl fmt::Display for Dot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.actor, self.counter)
    }
}
