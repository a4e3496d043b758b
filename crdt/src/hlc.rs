//! Hybrid logical clocks: physical time where clocks agree, logical order where they do not.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Error;

/// A hybrid logical clock value: milliseconds of physical time and a logical counter that
/// orders events within (or behind) the same millisecond. Ordered by `(physical_ms, logical)`.
///
/// ```
/// use geostate_crdt::Hlc;
/// assert!(Hlc::new(10, 5) < Hlc::new(11, 0));
/// assert!(Hlc::new(10, 5) > Hlc::new(10, 4));
/// ```
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    physical_ms: u64,
    logical: u32,
}

impl Hlc {
    /// The zero timestamp, before every other.
    pub const ZERO: Hlc = Hlc {
        physical_ms: 0,
        logical: 0,
    };

    /// A timestamp from its parts.
    pub const fn new(physical_ms: u64, logical: u32) -> Self {
        Self {
            physical_ms,
            logical,
        }
    }

    /// Physical part, milliseconds since the Unix epoch (or the simulation's epoch).
    pub const fn physical_ms(self) -> u64 {
        self.physical_ms
    }

    /// Logical part.
    pub const fn logical(self) -> u32 {
        self.logical
    }

    /// The smallest timestamp greater than `self`.
    pub const fn successor(self) -> Hlc {
        if self.logical == u32::MAX {
            Hlc::new(self.physical_ms.saturating_add(1), 0)
        } else {
            Hlc::new(self.physical_ms, self.logical + 1)
        }
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms, self.logical)
    }
}

/// The HLC state machine of one process. Physical time is always passed in by the caller; this
/// type never reads a clock.
///
/// Every timestamp it issues is greater than every timestamp it issued or observed before, so
/// an event ordered after another by causality also has a greater timestamp.
///
/// ```
/// use geostate_crdt::{Hlc, HlcClock};
/// let mut clock = HlcClock::new(1_000);
/// let t1 = clock.tick(500);
/// let t2 = clock.tick(500); // same millisecond: logical part advances
/// assert!(t2 > t1);
/// // A remote event from 200 ms in the future is adopted...
/// let t3 = clock.observe(Hlc::new(700, 3), 500).unwrap();
/// assert!(t3 > Hlc::new(700, 3));
/// // ...but one from an hour ahead is refused: a jumped clock must not drag ours along.
/// assert!(clock.observe(Hlc::new(3_600_500, 0), 500).is_err());
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HlcClock {
    last: Hlc,
    max_forward_ms: u64,
}

impl HlcClock {
    /// A clock that refuses remote timestamps more than `max_forward_ms` ahead of local
    /// physical time.
    pub const fn new(max_forward_ms: u64) -> Self {
        Self {
            last: Hlc::ZERO,
            max_forward_ms,
        }
    }

    /// A clock resuming after `last` (for example, the greatest timestamp found in storage).
    pub const fn resume(last: Hlc, max_forward_ms: u64) -> Self {
        Self {
            last,
            max_forward_ms,
        }
    }

    /// The greatest timestamp issued or observed so far.
    pub const fn last(&self) -> Hlc {
        self.last
    }

    /// The configured maximum forward offset.
    pub const fn max_forward_ms(&self) -> u64 {
        self.max_forward_ms
    }

    /// A timestamp for a local event at physical time `now_ms`.
    pub fn tick(&mut self, now_ms: u64) -> Hlc {
        self.last = if now_ms > self.last.physical_ms {
            Hlc::new(now_ms, 0)
        } else {
            self.last.successor()
        };
        self.last
    }

    /// Folds in a timestamp received from another process at local physical time `now_ms` and
    /// returns a timestamp for the receive event, greater than both.
    ///
    /// A remote timestamp more than the maximum forward offset ahead of `now_ms` is refused
    /// with [`Error::ClockAhead`] and leaves the clock unchanged.
    pub fn observe(&mut self, remote: Hlc, now_ms: u64) -> Result<Hlc, Error> {
        let ahead_ms = remote.physical_ms.saturating_sub(now_ms);
        if ahead_ms > self.max_forward_ms {
            return Err(Error::ClockAhead {
                remote,
                now_ms,
                max_forward_ms: self.max_forward_ms,
            });
        }
        let physical = now_ms.max(self.last.physical_ms).max(remote.physical_ms);
        let base = if physical == now_ms
            && physical != self.last.physical_ms
            && physical != remote.physical_ms
        {
            None
        } else {
            let mut logical_base = Hlc::new(physical, 0);
            if physical == self.last.physical_ms {
                logical_base = logical_base.max(self.last);
            }
            if physical == remote.physical_ms {
                logical_base = logical_base.max(remote);
            }
            Some(logical_base)
        };
        self.last = match base {
            None => Hlc::new(physical, 0),
            Some(b) => b.successor(),
        };
        Ok(self.last)
    }
}
