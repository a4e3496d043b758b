//! Rateless set reconciliation: a rateless invertible Bloom lookup table, after Yang, Gilad and
//! Alizadeh, "Practical Rateless Set Reconciliation" (SIGCOMM 2024, arXiv 2402.02668).
//!
//! Two regions each hold a set of 64-bit item ids (one per key: [`item_id`] of the key and its
//! value hash). Region A can describe its set by an endless sequence of *coded symbols*; region
//! B computes the same symbols of its own set, subtracts them from A's, and *peels* the
//! differences: the ids only A holds and the ids only B holds. About `1.35 d` symbols suffice
//! for `d` differences when `d` is large (more, relatively, for a handful), whatever the size
//! of the sets; a prefix of the sequence that is too short simply does not decode yet, and
//! more symbols can be asked for. That is what makes it *rateless*: nobody has to guess `d`
//! before the first byte is sent.
//!
//! ## Symbols
//! A symbol is a count, the XOR of the ids mapped to it and the XOR of a second hash of each
//! ([`check_hash`]). Each id is mapped to symbol 0 and then to a pseudo-random sequence of
//! growing indices ([`Indices`]), seeded by the id, such that it lands on index `i` with
//! probability about `1 / (1 + i/2)`: early symbols mix many ids, later ones few, so that
//! peeling finds pure symbols for any number of differences.
//!
//! On the wire a symbol is 13 bytes of fixed width ([`Symbol`]'s serde form): the count modulo
//! 256 (one byte), the id sum (8 bytes, little endian) and the check sum (4 bytes). A random
//! 64-bit sum would cost 9 bytes as a variable-length integer, and a count needs no more than
//! its low byte: peeling only asks whether a difference is `+1` or `-1` (255), and the check
//! sum tells a pure symbol from a mixed one whatever its count.
//!
//! ## Decoding
//! [`Decoder`] takes difference symbols (remote minus local) in order, in batches, and peels
//! as it goes. A symbol is *pure* when its count is `+1` or `-1`, its check sum is the check
//! hash of its id sum, and that id is mapped to its index. Peeling a pure symbol removes its id
//! from every symbol the id maps to, which empties it for good (in a consistent sketch every
//! other id of that symbol was peeled before). So each peel empties a distinct symbol: a
//! decoder never peels more ids than it holds symbols, and it never peels an id twice. Input
//! that breaks either rule (a corrupt or hostile sketch, or sketches of two different sets)
//! is reported as [`DecodeError`]: decoding always terminates, never panics, and never loops.
//! The sets are reconciled once every symbol is empty; in a consistent sketch that happens as
//! soon as symbol 0, which every id maps to, is.
//!
//! ```
//! use geostate_replication::iblt::{encode, Decoder};
//! let remote = [1u64, 2, 3, 40, 50];
//! let local = [1u64, 2, 3, 60];
//! let mut decoder = Decoder::new();
//! let mut from = 0;
//! while !decoder.is_decoded() {
//!     let theirs = encode(remote.iter().copied(), from, 4);
//!     let ours = encode(local.iter().copied(), from, 4);
//!     decoder.add(&theirs, &ours).unwrap();
//!     from += 4;
//! }
//! let mut remote_only = decoder.remote_only().to_vec();
//! remote_only.sort_unstable();
//! assert_eq!(remote_only, vec![40, 50]);
//! assert_eq!(decoder.local_only(), &[60]);
//! ```

use std::collections::BTreeSet;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes of one symbol on the wire.
pub const SYMBOL_WIRE_BYTES: usize = 13;

/// SplitMix64's finaliser: a bijection on `u64` that mixes every input bit into every output bit.
const fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The id of a key holding a value with hash `value_hash`: the key's digest entry hash
/// ([`geostate_backends::digest::entry_hash`]), so the XOR of a partition's ids is the XOR of
/// its digest buckets. Equal `(key, value)` pairs have equal ids in every region; this never
/// changes.
pub fn item_id(key: &geostate_backends::Key, value_hash: u64) -> u64 {
    geostate_backends::digest::entry_hash(key, value_hash)
}

/// The second hash of an id that a symbol accumulates to tell a pure symbol from a mixed one.
pub const fn check_hash(id: u64) -> u32 {
    (mix64(id ^ 0x6a09_e667_f3bc_c909) >> 32) as u32
}

/// One coded symbol: a count, the XOR of the ids mapped to it and the XOR of their check
/// hashes. Counts are kept modulo 256, as they travel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Symbol {
    /// Ids added minus ids removed, modulo 256.
    pub count: u8,
    /// XOR of the ids.
    pub sum: u64,
    /// XOR of the ids' [`check_hash`]es.
    pub check: u32,
}

impl Symbol {
    /// Adds `id` (from the remote set, or removes one of the local set: the same to a sum).
    fn add(&mut self, id: u64) {
        self.count = self.count.wrapping_add(1);
        self.sum ^= id;
        self.check ^= check_hash(id);
    }

    /// Removes `id`.
    fn remove(&mut self, id: u64) {
        self.count = self.count.wrapping_sub(1);
        self.sum ^= id;
        self.check ^= check_hash(id);
    }

    /// `self - other`: the symbol of the difference of two sets.
    pub fn minus(self, other: Symbol) -> Symbol {
        Symbol {
            count: self.count.wrapping_sub(other.count),
            sum: self.sum ^ other.sum,
            check: self.check ^ other.check,
        }
    }

    /// Whether the symbol is empty (of a difference: both sets agree on its ids).
    pub fn is_empty(&self) -> bool {
        self.count == 0 && self.sum == 0 && self.check == 0
    }

    /// The id and its side (`true`: only in the remote set) if the symbol looks pure by its
    /// count and check sum (the caller also checks that the id maps here).
    fn pure_candidate(&self) -> Option<(u64, bool)> {
        let remote = match self.count {
            1 => true,
            255 => false,
            _ => return None,
        };
        (check_hash(self.sum) == self.check).then_some((self.sum, remote))
    }
}

impl Serialize for Symbol {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (self.count, self.sum.to_le_bytes(), self.check.to_le_bytes()).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Symbol {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (count, sum, check) = <(u8, [u8; 8], [u8; 4])>::deserialize(deserializer)?;
        Ok(Symbol {
            count,
            sum: u64::from_le_bytes(sum),
            check: u32::from_le_bytes(check),
        })
    }
}

/// The indices of the symbols an id is mapped to, in increasing order: 0, then a
/// pseudo-random sequence seeded by the id in which index `i` appears with probability about
/// `1 / (1 + i/2)`. Integer arithmetic only, so every platform maps alike.
///
/// ```
/// use geostate_replication::iblt::Indices;
/// let first: Vec<u64> = Indices::new(42).take(4).collect();
/// assert_eq!(first[0], 0);
/// assert!(first.windows(2).all(|w| w[0] < w[1]));
/// ```
#[derive(Clone, Debug)]
pub struct Indices {
    state: u64,
    last: Option<u64>,
}

impl Indices {
    /// The indices of `id`.
    pub fn new(id: u64) -> Self {
        Self {
            state: id,
            last: None,
        }
    }

    /// Whether `id` is mapped to `index`.
    pub fn maps(id: u64, index: u64) -> bool {
        Indices::new(id).find(|&i| i >= index) == Some(index)
    }
}

impl Iterator for Indices {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let Some(last) = self.last else {
            self.last = Some(0);
            return Some(0);
        };
        if last == u64::MAX {
            return None;
        }
        // The paper's gap, ceil((last + 1.5) * (2^32 / sqrt(r) - 1)) for a uniform random r
        // in [1, 2^64], in integers: with s = isqrt(r) + 1 in [1, 2^32],
        // gap = ceil((2 last + 3) (2^32 - s) / (2 s)), at least 1.
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let r = mix64(self.state);
        let s = u128::from(isqrt(r)) + 1;
        let numerator = (2 * u128::from(last) + 3) * ((1u128 << 32) - s);
        let gap = numerator.div_ceil(2 * s).max(1);
        let next = u128::from(last) + gap;
        let next = u64::try_from(next).unwrap_or(u64::MAX);
        self.last = Some(next);
        Some(next)
    }
}

/// The integer square root of `n` (the largest `x` with `x * x <= n`).
fn isqrt(n: u64) -> u64 {
    if n < 2 {
        return n;
    }
    // Newton's method from above converges monotonically.
    let mut x = 1u64 << (64 - n.leading_zeros()).div_ceil(2);
    loop {
        let y = (x + n / x) / 2;
        if y >= x {
            return x;
        }
        x = y;
    }
}

/// Symbols `[from, from + len)` of the set `ids` (duplicates count twice).
pub fn encode(ids: impl IntoIterator<Item = u64>, from: u64, len: usize) -> Vec<Symbol> {
    let mut symbols = vec![Symbol::default(); len];
    let end = from.saturating_add(len as u64);
    for id in ids {
        for index in Indices::new(id) {
            if index >= end {
                break;
            }
            if let Some(offset) = index.checked_sub(from) {
                symbols[offset as usize].add(id);
            }
        }
    }
    symbols
}

/// Why a sketch does not decode: the symbols do not describe the difference of two sets (they
/// are corrupt, hostile, or taken from a set that changed between batches).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// An id peeled a second time.
    #[error("id {0:#018x} peeled twice")]
    Repeated(u64),
    /// More ids peeled than symbols received.
    #[error("more ids peeled than symbols received")]
    TooManyIds,
    /// Symbol 0 is empty but another symbol is not.
    #[error("symbol 0 is empty but symbol {0} is not")]
    Inconsistent(u64),
    /// The remote and local batches differ in length.
    #[error("batches of {remote} and {local} symbols")]
    Lengths {
        /// Remote symbols given.
        remote: usize,
        /// Local symbols given.
        local: usize,
    },
}

/// Peels the difference of two sets from their symbols, batch by batch (see the
/// [module docs](self)).
#[derive(Clone, Debug, Default)]
pub struct Decoder {
    /// Difference symbols received, with every peeled id removed.
    symbols: Vec<Symbol>,
    /// Indices whose symbol is not empty.
    nonempty: usize,
    remote_only: Vec<u64>,
    local_only: Vec<u64>,
    peeled: BTreeSet<u64>,
}

impl Decoder {
    /// A decoder with no symbols.
    pub fn new() -> Self {
        Self::default()
    }

    /// Symbols received so far.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// Whether no symbol was received yet.
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Ids only the remote set holds, in the order they were peeled.
    pub fn remote_only(&self) -> &[u64] {
        &self.remote_only
    }

    /// Ids only the local set holds, in the order they were peeled.
    pub fn local_only(&self) -> &[u64] {
        &self.local_only
    }

    /// Whether the difference is fully known: at least one symbol, and every symbol empty
    /// after peeling.
    pub fn is_decoded(&self) -> bool {
        !self.symbols.is_empty() && self.nonempty == 0
    }

    /// Takes the next symbols of both sets (`remote[i]` and `local[i]` are symbol
    /// `self.len() + i` of each) and peels what it can. An error leaves the decoder unusable
    /// for this pair of sets: the sketch is not that of a difference.
    pub fn add(&mut self, remote: &[Symbol], local: &[Symbol]) -> Result<(), DecodeError> {
        if remote.len() != local.len() {
            return Err(DecodeError::Lengths {
                remote: remote.len(),
                local: local.len(),
            });
        }
        let from = self.symbols.len() as u64;
        self.symbols
            .extend(remote.iter().zip(local).map(|(r, l)| r.minus(*l)));
        let end = self.symbols.len() as u64;
        // Ids peeled already leave the new symbols too.
        for (ids, remote_side) in [(&self.remote_only, true), (&self.local_only, false)] {
            for &id in ids {
                for index in Indices::new(id).skip_while(|&i| i < from) {
                    if index >= end {
                        break;
                    }
                    let symbol = &mut self.symbols[index as usize];
                    if remote_side {
                        symbol.remove(id);
                    } else {
                        symbol.add(id);
                    }
                }
            }
        }
        self.nonempty += self.symbols[from as usize..]
            .iter()
            .filter(|s| !s.is_empty())
            .count();
        self.peel((from..end).collect())?;
        if self.symbols.first().is_some_and(Symbol::is_empty) && self.nonempty > 0 {
            let index = self.symbols.iter().position(|s| !s.is_empty()).unwrap_or(0);
            return Err(DecodeError::Inconsistent(index as u64));
        }
        Ok(())
    }

    /// Peels pure symbols, starting with `candidates`, until none is left.
    fn peel(&mut self, mut candidates: Vec<u64>) -> Result<(), DecodeError> {
        let end = self.symbols.len() as u64;
        while let Some(index) = candidates.pop() {
            let Some((id, remote)) = self.symbols[index as usize].pure_candidate() else {
                continue;
            };
            if !Indices::maps(id, index) {
                continue;
            }
            if self.peeled.len() >= self.symbols.len() {
                return Err(DecodeError::TooManyIds);
            }
            if !self.peeled.insert(id) {
                return Err(DecodeError::Repeated(id));
            }
            if remote {
                self.remote_only.push(id);
            } else {
                self.local_only.push(id);
            }
            for i in Indices::new(id) {
                if i >= end {
                    break;
                }
                let symbol = &mut self.symbols[i as usize];
                let was_empty = symbol.is_empty();
                if remote {
                    symbol.remove(id);
                } else {
                    symbol.add(id);
                }
                match (was_empty, symbol.is_empty()) {
                    (true, false) => self.nonempty += 1,
                    (false, true) => self.nonempty = self.nonempty.saturating_sub(1),
                    _ => {}
                }
                if matches!(symbol.count, 1 | 255) {
                    candidates.push(i);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn isqrt_is_exact() {
        for n in (0..10_000u64).chain([u64::MAX, u64::MAX - 1, 1 << 62, (1 << 32) - 1]) {
            let r = isqrt(n);
            assert!(u128::from(r) * u128::from(r) <= u128::from(n), "{n}");
            assert!(u128::from(r + 1) * u128::from(r + 1) > u128::from(n), "{n}");
        }
    }

    #[test]
    fn indices_saturate_instead_of_wrapping() {
        let mut indices = Indices::new(1);
        indices.last = Some(u64::MAX - 1);
        assert_eq!(indices.next(), Some(u64::MAX));
        assert_eq!(indices.next(), None);
    }
}
