//! Region configuration, loadable from TOML.

use std::path::Path;

use geostate_backends::{fnv1a64, Layout};
use geostate_crdt::ActorId;
use serde::Deserialize;

use crate::{RegionError, RegionId};

/// Which store a region keeps its state in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "StoreTable")]
#[non_exhaustive]
pub enum StoreConfig {
    /// The embedded in-memory store (the default).
    #[default]
    Memory,
}

/// The `[store]` table as written. Serde does not enforce `deny_unknown_fields` on the unit
/// variants of an internally tagged enum (serde-rs/serde#2123), so the table is read through
/// this strict struct: a stray key under `[store]` is an error, not silently ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreTable {
    kind: StoreKind,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum StoreKind {
    Memory,
}

impl From<StoreTable> for StoreConfig {
    fn from(table: StoreTable) -> Self {
        match table.kind {
            StoreKind::Memory => StoreConfig::Memory,
        }
    }
}

/// Partitioning and limits of the store; every region of a deployment must agree on
/// `partitions` and `buckets`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LayoutConfig {
    /// Partitions of the keyspace (1..=4096).
    pub partitions: u16,
    /// Digest buckets per partition (1..=4096).
    pub buckets: u16,
    /// Largest encoded value, in bytes.
    pub value_bytes_max: usize,
    /// Change-feed entries kept per partition.
    pub feed_entries_max: usize,
}

impl Default for LayoutConfig {
    fn default() -> Self {
        let layout = Layout::default();
        Self {
            partitions: layout.partitions(),
            buckets: layout.buckets(),
            value_bytes_max: layout.value_bytes_max(),
            feed_entries_max: layout.feed_entries_max(),
        }
    }
}

impl LayoutConfig {
    /// The validated layout.
    pub fn to_layout(&self) -> Result<Layout, RegionError> {
        Ok(Layout::new(
            self.partitions,
            self.buckets,
            self.value_bytes_max,
            self.feed_entries_max,
        )?)
    }
}

/// A built-in conflict resolution policy for opaque values, by key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum ResolverPolicy {
    /// Last writer wins by `(HLC, actor)` (the default for every key).
    Lww,
    /// Keep every sibling; the application resolves on read.
    KeepSiblings,
}

/// One `[[resolvers]]` entry.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverConfig {
    /// Keys starting with this prefix use `policy` (the longest matching prefix wins).
    pub prefix: String,
    /// The policy.
    pub policy: ResolverPolicy,
}

/// Limits on region operations.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegionLimits {
    /// Most items in one batch call.
    pub batch_items_max: usize,
    /// Largest forward offset of a remote HLC timestamp accepted, in milliseconds.
    pub clock_forward_ms_max: u64,
    /// Conflicts remembered per process so a conflict read repeatedly is recorded once.
    pub conflicts_remembered_max: usize,
}

impl Default for RegionLimits {
    fn default() -> Self {
        Self {
            batch_items_max: 10_000,
            clock_forward_ms_max: 60_000,
            conflicts_remembered_max: 10_000,
        }
    }
}

/// Everything a [`crate::Region`] needs to know.
///
/// ```
/// use geostate_regions::{RegionConfig, ResolverPolicy};
/// let config = RegionConfig::from_toml_str(r#"
///     region = "us-east"
///     node = 3
///
///     [store]
///     kind = "memory"
///
///     [layout]
///     partitions = 128
///
///     [[resolvers]]
///     prefix = "profile:"
///     policy = "keep-siblings"
/// "#).unwrap();
/// assert_eq!(config.region.as_str(), "us-east");
/// assert_eq!(config.layout.partitions, 128);
/// assert_eq!(config.resolvers[0].policy, ResolverPolicy::KeepSiblings);
/// assert_ne!(config.actor().unwrap(), RegionConfig::new("eu-west".parse().unwrap()).actor().unwrap());
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    /// This region's name.
    pub region: RegionId,
    /// This process's node number within the region (0..2^24); with the region it makes the
    /// actor id.
    #[serde(default)]
    pub node: u32,
    /// An explicit actor id, overriding the one derived from region and node.
    #[serde(default)]
    pub actor: Option<u64>,
    /// The store.
    #[serde(default)]
    pub store: StoreConfig,
    /// Partitioning and size limits.
    #[serde(default)]
    pub layout: LayoutConfig,
    /// Conflict resolution policies by key prefix.
    #[serde(default)]
    pub resolvers: Vec<ResolverConfig>,
    /// Operation limits.
    #[serde(default)]
    pub limits: RegionLimits,
}

impl std::str::FromStr for RegionId {
    type Err = RegionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RegionId::new(s)
    }
}

/// Node numbers must fit in the low 24 bits of an actor id.
pub const NODE_MAX: u32 = (1 << 24) - 1;

impl RegionConfig {
    /// A configuration with every default: node 0, the memory store, 256 partitions.
    pub fn new(region: RegionId) -> Self {
        Self {
            region,
            node: 0,
            actor: None,
            store: StoreConfig::default(),
            layout: LayoutConfig::default(),
            resolvers: Vec::new(),
            limits: RegionLimits::default(),
        }
    }

    /// Parses a TOML document.
    pub fn from_toml_str(text: &str) -> Result<Self, RegionError> {
        toml::from_str(text).map_err(|e| RegionError::Config(e.to_string()))
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, RegionError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| RegionError::Config(format!("reading {}: {e}", path.display())))?;
        Self::from_toml_str(&text)
    }

    /// This process's actor id: the explicit `actor`, or the upper 40 bits from FNV-1a 64 of
    /// the region name and the lower 24 bits from the node number, so actors of different
    /// regions never collide by construction of their node numbers alone.
    pub fn actor(&self) -> Result<ActorId, RegionError> {
        if let Some(actor) = self.actor {
            return Ok(ActorId::new(actor));
        }
        if self.node > NODE_MAX {
            return Err(RegionError::Config(format!(
                "node {} exceeds the maximum {NODE_MAX}",
                self.node
            )));
        }
        let region_bits = fnv1a64(self.region.as_str().as_bytes()) << 24;
        Ok(ActorId::new(region_bits | u64::from(self.node)))
    }
}
