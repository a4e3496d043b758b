//! Which resolver handles which key: the longest registered key prefix wins.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use crate::{Error, LwwResolver, SharedResolver};

/// Resolvers by key prefix, with a default for keys no prefix matches.
///
/// A key is handled by the resolver of the longest registered prefix it starts with; keys that
/// match no prefix go to the default, [`LwwResolver`] unless set with
/// [`with_default`](ResolverRegistry::with_default). Prefixes are compared as bytes, so
/// `"cart"` also matches `"cartography"`: end prefixes with a separator (`"cart:"`).
///
/// Every region must hold the same registry (it comes from the deployment's configuration):
/// a resolver is deterministic only given the same resolver.
///
/// ```
/// use std::sync::Arc;
/// use geostate_conflict::{KeepSiblings, LwwResolver, ResolverRegistry};
///
/// let mut registry = ResolverRegistry::new();
/// registry.register("profile:", Arc::new(KeepSiblings))?;
/// registry.register("profile:cache:", Arc::new(LwwResolver))?;
///
/// assert_eq!(registry.resolver_for("profile:7").name(), "keep-siblings");
/// assert_eq!(registry.resolver_for("profile:cache:7").name(), "lww"); // longer prefix
/// assert_eq!(registry.resolver_for("visits").name(), "lww"); // default
/// # Ok::<(), geostate_conflict::Error>(())
/// ```
#[derive(Clone)]
pub struct ResolverRegistry {
    default: SharedResolver,
    by_prefix: BTreeMap<String, SharedResolver>,
}

impl ResolverRegistry {
    /// A registry with no prefixes and [`LwwResolver`] as the default.
    ///
    /// ```
    /// use geostate_conflict::ResolverRegistry;
    /// let registry = ResolverRegistry::new();
    /// assert_eq!(registry.resolver_for("any:key").name(), "lww");
    /// ```
    pub fn new() -> Self {
        Self::with_default(Arc::new(LwwResolver))
    }

    /// A registry with no prefixes and `default` for every key.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use geostate_conflict::{KeepSiblings, ResolverRegistry};
    /// let registry = ResolverRegistry::with_default(Arc::new(KeepSiblings));
    /// assert_eq!(registry.resolver_for("any:key").name(), "keep-siblings");
    /// ```
    pub fn with_default(default: SharedResolver) -> Self {
        Self {
            default,
            by_prefix: BTreeMap::new(),
        }
    }

    /// Makes `resolver` handle the keys starting with `prefix` (unless a longer registered
    /// prefix also matches).
    ///
    /// An empty prefix is [`Error::EmptyPrefix`] (it would be a second default: use
    /// [`with_default`](ResolverRegistry::with_default)); a prefix already registered is
    /// [`Error::DuplicatePrefix`]. On error the registry is unchanged.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use geostate_conflict::{Error, KeepSiblings, LwwResolver, ResolverRegistry};
    /// let mut registry = ResolverRegistry::new();
    /// registry.register("doc:", Arc::new(KeepSiblings)).unwrap();
    /// assert_eq!(
    ///     registry.register("doc:", Arc::new(LwwResolver)),
    ///     Err(Error::DuplicatePrefix { prefix: "doc:".into() })
    /// );
    /// assert_eq!(registry.register("", Arc::new(LwwResolver)), Err(Error::EmptyPrefix));
    /// assert_eq!(registry.resolver_for("doc:1").name(), "keep-siblings");
    /// ```
    pub fn register(
        &mut self,
        prefix: impl Into<String>,
        resolver: SharedResolver,
    ) -> Result<(), Error> {
        let prefix = prefix.into();
        if prefix.is_empty() {
            return Err(Error::EmptyPrefix);
        }
        if self.by_prefix.contains_key(&prefix) {
            return Err(Error::DuplicatePrefix { prefix });
        }
        self.by_prefix.insert(prefix, resolver);
        Ok(())
    }

    /// The resolver for `key`: the one of the longest registered prefix of `key`, else the
    /// default.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use geostate_conflict::{KeepSiblings, ResolverRegistry};
    /// let mut registry = ResolverRegistry::new();
    /// registry.register("a:", Arc::new(KeepSiblings))?;
    /// assert_eq!(registry.resolver_for("a:1").name(), "keep-siblings");
    /// assert_eq!(registry.resolver_for("a").name(), "lww"); // shorter than the prefix
    /// # Ok::<(), geostate_conflict::Error>(())
    /// ```
    pub fn resolver_for(&self, key: &str) -> &SharedResolver {
        // Prefixes are distinct, so at most one matching prefix has the greatest length.
        self.by_prefix
            .iter()
            .filter(|(prefix, _)| key.starts_with(prefix.as_str()))
            .max_by_key(|(prefix, _)| prefix.len())
            .map_or(&self.default, |(_, resolver)| resolver)
    }

    /// The resolver for keys that match no prefix.
    ///
    /// ```
    /// use geostate_conflict::ResolverRegistry;
    /// assert_eq!(ResolverRegistry::default().default_resolver().name(), "lww");
    /// ```
    pub fn default_resolver(&self) -> &SharedResolver {
        &self.default
    }

    /// The registered `(prefix, resolver name)` pairs, in prefix order (for status pages and
    /// configuration checks).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use geostate_conflict::{KeepSiblings, LwwResolver, ResolverRegistry};
    /// let mut registry = ResolverRegistry::new();
    /// registry.register("b:", Arc::new(LwwResolver))?;
    /// registry.register("a:", Arc::new(KeepSiblings))?;
    /// let listed: Vec<_> = registry.prefixes().collect();
    /// assert_eq!(listed, [("a:", "keep-siblings"), ("b:", "lww")]);
    /// # Ok::<(), geostate_conflict::Error>(())
    /// ```
    pub fn prefixes(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.by_prefix
            .iter()
            .map(|(prefix, resolver)| (prefix.as_str(), resolver.name()))
    }
}

impl Default for ResolverRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ResolverRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Prefixes<'r>(&'r ResolverRegistry);
        impl fmt::Debug for Prefixes<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.debug_map().entries(self.0.prefixes()).finish()
            }
        }
        f.debug_struct("ResolverRegistry")
            .field("default", &self.default.name())
            .field("by_prefix", &Prefixes(self))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KeepSiblings, Resolution, Resolver, Sibling};

    struct Named(&'static str);

    impl Resolver for Named {
        fn name(&self) -> &str {
            self.0
        }
        fn resolve(&self, _key: &str, _siblings: &[Sibling<'_>]) -> Resolution {
            Resolution::KeepSiblings
        }
    }

    fn registry(prefixes: &[&'static str]) -> ResolverRegistry {
        let mut r = ResolverRegistry::new();
        for p in prefixes {
            assert_eq!(r.register(*p, Arc::new(Named(p))), Ok(()));
        }
        r
    }

    #[test]
    fn longest_prefix_wins_whatever_the_registration_order() {
        for order in [["a", "ab", "abc"], ["abc", "a", "ab"], ["ab", "abc", "a"]] {
            let r = registry(&order);
            assert_eq!(r.resolver_for("abcd").name(), "abc");
            assert_eq!(r.resolver_for("abc").name(), "abc");
            assert_eq!(r.resolver_for("abx").name(), "ab");
            assert_eq!(r.resolver_for("ax").name(), "a");
            assert_eq!(r.resolver_for("b").name(), "lww");
            assert_eq!(r.resolver_for("").name(), "lww");
        }
    }

    #[test]
    fn greatest_prefix_below_key_need_not_match() {
        // "ab" sorts between "a" and "ac" but is not a prefix of "ac".
        let r = registry(&["a", "ab"]);
        assert_eq!(r.resolver_for("ac").name(), "a");
    }

    #[test]
    fn prefixes_match_bytes_not_words() {
        let r = registry(&["cart"]);
        assert_eq!(r.resolver_for("cartography").name(), "cart");
    }

    #[test]
    fn errors_leave_the_registry_unchanged() {
        let mut r = registry(&["x:"]);
        assert_eq!(
            r.register("x:", Arc::new(KeepSiblings)),
            Err(Error::DuplicatePrefix {
                prefix: "x:".to_owned()
            })
        );
        assert_eq!(
            r.register("", Arc::new(KeepSiblings)),
            Err(Error::EmptyPrefix)
        );
        assert_eq!(r.prefixes().collect::<Vec<_>>(), [("x:", "x:")]);
        assert_eq!(r.default_resolver().name(), "lww");
    }

    #[test]
    fn debug_lists_names() {
        let r = registry(&["p:"]);
        assert_eq!(
            format!("{r:?}"),
            "ResolverRegistry { default: \"lww\", by_prefix: {\"p:\": \"p:\"} }"
        );
    }
}
