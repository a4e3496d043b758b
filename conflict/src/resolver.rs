//! Resolvers: what a read shows when an opaque value has concurrent writes (siblings).
//!
//! A [`Resolver`] sees the siblings of one key, sorted, and returns a [`Resolution`]: one value
//! or "keep the siblings". Three are built in: [`LwwResolver`] (the default), [`KeepSiblings`]
//! and [`FnResolver`] around a custom function.

use std::fmt;
use std::sync::Arc;

use geostate_crdt::{ActorId, Dot, Hlc, Stamped};

/// One concurrent write of an opaque value, as a resolver sees it: the write's dot, its HLC
/// timestamp and its bytes.
///
/// Siblings are ordered by dot, then HLC, then bytes. Resolvers always receive them in that
/// order, without duplicates; within one register dots are unique, so this is dot order.
///
/// ```
/// use geostate_conflict::{ActorId, Dot, Hlc, Sibling};
/// let early = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(100, 0), b"left");
/// let late = Sibling::new(Dot::new(ActorId::new(1), 7), Hlc::new(200, 0), b"right");
/// // Sorted by dot: actor 1 comes first although it wrote later.
/// assert!(late < early);
/// // Ranked for last-writer-wins by (HLC, actor, counter).
/// assert!(late.lww_rank() > early.lww_rank());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct Sibling<'a> {
    /// The write's event identity.
    pub dot: Dot,
    /// The write's timestamp.
    pub hlc: Hlc,
    /// The written bytes.
    pub value: &'a [u8],
}

impl<'a> Sibling<'a> {
    /// A sibling from its parts (for example, to test a custom resolver).
    ///
    /// ```
    /// use geostate_conflict::{ActorId, Dot, Hlc, Sibling};
    /// let s = Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(5, 0), b"v");
    /// assert_eq!(s.value, b"v");
    /// ```
    pub const fn new(dot: Dot, hlc: Hlc, value: &'a [u8]) -> Self {
        Self { dot, hlc, value }
    }

    /// The last-writer-wins rank: `(HLC, actor, dot counter)`, the order of geostate's
    /// [`LwwRegister`](geostate_crdt::LwwRegister). The greatest rank wins.
    ///
    /// ```
    /// use geostate_conflict::{ActorId, Dot, Hlc, Sibling};
    /// let a = Sibling::new(Dot::new(ActorId::new(1), 9), Hlc::new(5, 0), b"a");
    /// let b = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(5, 0), b"b");
    /// // Same timestamp: the greater actor wins the tie.
    /// assert!(b.lww_rank() > a.lww_rank());
    /// ```
    pub const fn lww_rank(&self) -> (Hlc, ActorId, u64) {
        (self.hlc, self.dot.actor, self.dot.counter)
    }
}

impl<'a> From<(Dot, &'a Stamped<Vec<u8>>)> for Sibling<'a> {
    /// The view of one entry of [`MvRegister::siblings`](geostate_crdt::MvRegister::siblings).
    fn from((dot, stamped): (Dot, &'a Stamped<Vec<u8>>)) -> Self {
        Self::new(dot, stamped.hlc, &stamped.value)
    }
}

/// What a resolver decided for a key with two or more siblings.
///
/// ```
/// use geostate_conflict::Resolution;
/// let merged = Resolution::Chosen(b"left+right".to_vec());
/// assert_ne!(merged, Resolution::KeepSiblings);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Resolution {
    /// Reads show this one value: one sibling's bytes, or a merge of several.
    Chosen(Vec<u8>),
    /// Reads show every sibling; the application resolves on read (and usually writes its
    /// resolution back, which replaces the siblings it has seen).
    KeepSiblings,
}

/// Decides what a read shows when a key holds two or more siblings.
///
/// To ensure correctness:
/// - [`resolve`](Resolver::resolve) is deterministic: its result depends only on `key` and
///   `siblings`; no clock, no randomness, no state that differs between regions or processes.
///   Every region that holds the same siblings must show the same value.
/// - It does not depend on the order of `siblings` beyond the documented one: siblings are
///   always passed sorted (see [`Sibling`]), at least two of them, without duplicates.
/// - [`name`](Resolver::name) is stable: it is written into every [`ConflictRecord`] and
///   operators read it from the conflict feed.
///
/// The chosen value need not be one of the siblings: a resolver may merge them.
///
/// ```
/// use geostate_conflict::{Resolution, Resolver, Sibling};
///
/// /// Keeps the longest value; ties go to the greatest bytes.
/// struct Longest;
///
/// impl Resolver for Longest {
///     fn name(&self) -> &str {
///         "longest"
///     }
///     fn resolve(&self, _key: &str, siblings: &[Sibling<'_>]) -> Resolution {
///         let best = siblings.iter().map(|s| s.value).max_by_key(|v| (v.len(), *v));
///         Resolution::Chosen(best.unwrap_or_default().to_vec())
///     }
/// }
/// # use geostate_conflict::{ActorId, Dot, Hlc};
/// # let (a, b) = (Dot::new(ActorId::new(1), 1), Dot::new(ActorId::new(2), 1));
/// # let s = [Sibling::new(a, Hlc::new(1, 0), b"ab"), Sibling::new(b, Hlc::new(2, 0), b"c")];
/// # assert_eq!(Longest.resolve("k", &s), Resolution::Chosen(b"ab".to_vec()));
/// ```
///
/// [`ConflictRecord`]: crate::ConflictRecord
pub trait Resolver {
    /// A short, stable name recorded in conflict records (for example `"lww"`).
    fn name(&self) -> &str;

    /// The resolution of `key`'s `siblings`: at least two, sorted, without duplicates.
    fn resolve(&self, key: &str, siblings: &[Sibling<'_>]) -> Resolution;
}

/// How resolvers are held by a [`ResolverRegistry`](crate::ResolverRegistry): shared and
/// usable from any thread.
///
/// ```
/// use std::sync::Arc;
/// use geostate_conflict::{KeepSiblings, SharedResolver};
/// let shared: SharedResolver = Arc::new(KeepSiblings);
/// assert_eq!(shared.name(), "keep-siblings");
/// ```
pub type SharedResolver = Arc<dyn Resolver + Send + Sync>;

/// Last writer wins (the default): the sibling with the greatest `(HLC, actor, dot counter)`,
/// the same order as geostate's [`LwwRegister`](geostate_crdt::LwwRegister). Every region
/// picks the same winner however the siblings arrived.
///
/// ```
/// use geostate_conflict::{ActorId, Dot, Hlc, LwwResolver, Resolution, Resolver, Sibling};
/// let siblings = [
///     Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(300, 0), b"newest"),
///     Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(100, 0), b"older"),
/// ];
/// assert_eq!(LwwResolver.resolve("k", &siblings), Resolution::Chosen(b"newest".to_vec()));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LwwResolver;

impl LwwResolver {
    /// The name recorded in conflict records.
    pub const NAME: &'static str = "lww";

    /// The winning sibling: greatest [`lww_rank`](Sibling::lww_rank), then greatest bytes (a
    /// tie of rank needs two siblings with the same dot, which one register never holds).
    /// `None` only for an empty slice.
    ///
    /// ```
    /// use geostate_conflict::{ActorId, Dot, Hlc, LwwResolver, Sibling};
    /// let hlc = Hlc::new(7, 0);
    /// let siblings = [
    ///     Sibling::new(Dot::new(ActorId::new(3), 1), hlc, b"x"),
    ///     Sibling::new(Dot::new(ActorId::new(3), 2), hlc, b"y"),
    /// ];
    /// // Same timestamp and actor: the later event of that actor wins.
    /// assert_eq!(LwwResolver::winner(&siblings).map(|s| s.value), Some(&b"y"[..]));
    /// assert!(LwwResolver::winner(&[]).is_none());
    /// ```
    pub fn winner<'s, 'a>(siblings: &'s [Sibling<'a>]) -> Option<&'s Sibling<'a>> {
        siblings.iter().max_by_key(|s| (s.lww_rank(), s.value))
    }
}

impl Resolver for LwwResolver {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn resolve(&self, _key: &str, siblings: &[Sibling<'_>]) -> Resolution {
        // An empty slice breaks the trait's contract; the empty value is the neutral answer.
        let value = Self::winner(siblings).map(|s| s.value).unwrap_or_default();
        Resolution::Chosen(value.to_vec())
    }
}

/// Keeps every sibling: reads return all of them and the application resolves on read.
///
/// ```
/// use geostate_conflict::{ActorId, Dot, Hlc, KeepSiblings, Resolution, Resolver, Sibling};
/// let siblings = [
///     Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(1, 0), b"a"),
///     Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(2, 0), b"b"),
/// ];
/// assert_eq!(KeepSiblings.resolve("k", &siblings), Resolution::KeepSiblings);
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct KeepSiblings;

impl KeepSiblings {
    /// The name recorded in conflict records.
    pub const NAME: &'static str = "keep-siblings";
}

impl Resolver for KeepSiblings {
    fn name(&self) -> &str {
        Self::NAME
    }

    fn resolve(&self, _key: &str, _siblings: &[Sibling<'_>]) -> Resolution {
        Resolution::KeepSiblings
    }
}

/// A resolver around a custom function of the key and the siblings, returning the value reads
/// show. The value may be one sibling's bytes or a merge of several.
///
/// The function must be deterministic (see [`Resolver`]): a pure function of its arguments,
/// the same in every region. It may rely on the siblings' order, which is always the sorted
/// order of [`Sibling`] (by dot), never the order in which writes arrived.
///
/// ```
/// use geostate_conflict::{ActorId, Dot, FnResolver, Hlc, Resolution, Resolver, Sibling};
///
/// // Union of comma-separated tags: a merge, not a pick.
/// let union = FnResolver::new("tag-union", |_key: &str, siblings: &[Sibling<'_>]| {
///     let mut tags: Vec<&[u8]> = siblings
///         .iter()
///         .flat_map(|s| s.value.split(|b| *b == b','))
///         .filter(|t| !t.is_empty())
///         .collect();
///     tags.sort();
///     tags.dedup();
///     tags.join(&b","[..])
/// });
/// let siblings = [
///     Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(1, 0), b"red,blue"),
///     Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(2, 0), b"green,red"),
/// ];
/// assert_eq!(union.name(), "tag-union");
/// assert_eq!(union.resolve("t", &siblings), Resolution::Chosen(b"blue,green,red".to_vec()));
/// ```
pub struct FnResolver<F> {
    name: String,
    f: F,
}

impl<F> FnResolver<F>
where
    F: Fn(&str, &[Sibling<'_>]) -> Vec<u8>,
{
    /// A resolver recorded as `name` that shows `f(key, siblings)` on read.
    ///
    /// ```
    /// use geostate_conflict::{FnResolver, Resolver, Sibling};
    /// let first = FnResolver::new("first-by-dot", |_: &str, s: &[Sibling<'_>]| {
    ///     s.first().map(|s| s.value.to_vec()).unwrap_or_default()
    /// });
    /// assert_eq!(first.name(), "first-by-dot");
    /// ```
    pub fn new(name: impl Into<String>, f: F) -> Self {
        Self {
            name: name.into(),
            f,
        }
    }
}

impl<F> Resolver for FnResolver<F>
where
    F: Fn(&str, &[Sibling<'_>]) -> Vec<u8>,
{
    fn name(&self) -> &str {
        &self.name
    }

    fn resolve(&self, key: &str, siblings: &[Sibling<'_>]) -> Resolution {
        Resolution::Chosen((self.f)(key, siblings))
    }
}

impl<F> fmt::Debug for FnResolver<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnResolver")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(actor: u64, counter: u64, physical_ms: u64, value: &[u8]) -> Sibling<'_> {
        Sibling::new(
            Dot::new(ActorId::new(actor), counter),
            Hlc::new(physical_ms, 0),
            value,
        )
    }

    #[test]
    fn lww_prefers_greater_hlc_over_greater_actor() {
        let s = [sib(9, 1, 10, b"big-actor"), sib(1, 1, 11, b"later")];
        assert_eq!(
            LwwResolver.resolve("k", &s),
            Resolution::Chosen(b"later".to_vec())
        );
    }

    #[test]
    fn lww_breaks_hlc_tie_by_actor_then_counter() {
        let s = [sib(1, 5, 10, b"a1"), sib(2, 1, 10, b"a2")];
        assert_eq!(
            LwwResolver.resolve("k", &s),
            Resolution::Chosen(b"a2".to_vec())
        );
        let s = [sib(2, 2, 10, b"second"), sib(2, 1, 10, b"first")];
        assert_eq!(
            LwwResolver.resolve("k", &s),
            Resolution::Chosen(b"second".to_vec())
        );
    }

    #[test]
    fn lww_uses_logical_part_of_hlc() {
        let a = Sibling::new(Dot::new(ActorId::new(2), 1), Hlc::new(10, 1), b"a");
        let b = Sibling::new(Dot::new(ActorId::new(1), 1), Hlc::new(10, 2), b"b");
        assert_eq!(LwwResolver::winner(&[a, b]), Some(&b));
    }

    #[test]
    fn lww_on_empty_slice_is_the_empty_value() {
        assert_eq!(
            LwwResolver.resolve("k", &[]),
            Resolution::Chosen(Vec::new())
        );
    }

    #[test]
    fn sibling_order_is_dot_first() {
        let mut s = [sib(2, 1, 1, b"z"), sib(1, 2, 9, b"a"), sib(1, 1, 5, b"m")];
        s.sort();
        let dots: Vec<_> = s
            .iter()
            .map(|s| (s.dot.actor.get(), s.dot.counter))
            .collect();
        assert_eq!(dots, [(1, 1), (1, 2), (2, 1)]);
    }

    #[test]
    fn fn_resolver_passes_key_and_siblings() {
        let r = FnResolver::new("echo-key", |key: &str, s: &[Sibling<'_>]| {
            format!("{key}:{}", s.len()).into_bytes()
        });
        let s = [sib(1, 1, 1, b"a"), sib(2, 1, 1, b"b")];
        assert_eq!(r.resolve("k7", &s), Resolution::Chosen(b"k7:2".to_vec()));
        assert_eq!(format!("{r:?}"), "FnResolver { name: \"echo-key\", .. }");
    }

    #[test]
    fn names_are_stable() {
        assert_eq!(LwwResolver.name(), "lww");
        assert_eq!(KeepSiblings.name(), "keep-siblings");
    }
}
