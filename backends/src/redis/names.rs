//! Redis key names: every key of a partition carries the partition's hash tag, so that one
//! script can touch the value, the feed and the digest even on Redis Cluster.

use crate::Key;

/// The key names of one store (one key prefix).
#[derive(Clone, Debug)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    pub(crate) fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// `{<prefix>p<partition>}`: the hash tag of a partition.
    pub(crate) fn tag(&self, partition: u16) -> String {
        format!("{{{}p{partition}}}", self.prefix)
    }

    fn part(&self, partition: u16, suffix: &str) -> Vec<u8> {
        format!("{}:{suffix}", self.tag(partition)).into_bytes()
    }

    /// Everything before the key in a value's name.
    pub(crate) fn value_prefix(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "v:")
    }

    /// `{..}:v:<key>`: the value's envelope (a string).
    pub(crate) fn value(&self, partition: u16, key: &Key) -> Vec<u8> {
        let mut name = self.value_prefix(partition);
        name.extend_from_slice(key.as_str().as_bytes());
        name
    }

    /// `{..}:m:<bucket>`: hash of key -> "<version> <commit token> <seq> <value hash><entry hash>".
    pub(crate) fn meta(&self, partition: u16, bucket: u16) -> Vec<u8> {
        self.part(partition, &format!("m:{bucket}"))
    }

    /// `{..}:i`: sorted set of the partition's keys (all scored 0, ordered by bytes).
    pub(crate) fn index(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "i")
    }

    /// `{..}:t`: sorted set of the partition's tombstones (keys whose value holds no live dot),
    /// all scored 0, ordered by bytes.
    pub(crate) fn tombstones(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "t")
    }

    /// `{..}:fl`: the partition's dot floor, a hash of actor id -> highest counter of that
    /// actor in any value removed from the partition (decimal).
    pub(crate) fn floor(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "fl")
    }

    /// `{..}:d`: hash of bucket -> fingerprint (16 hex digits; absent = 0).
    pub(crate) fn digest(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "d")
    }

    /// `{..}:n`: hash with the version clock `v` and the last feed seq `s`.
    pub(crate) fn counters(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "n")
    }

    /// `{..}:f`: the change feed, a stream with entry ids `<seq>-0`.
    pub(crate) fn feed(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "f")
    }

    /// `{..}:c`: hash of origin region -> replication cursor.
    pub(crate) fn cursors(&self, partition: u16) -> Vec<u8> {
        self.part(partition, "c")
    }

    fn global(&self, suffix: &str) -> Vec<u8> {
        format!("{{{}x}}:{suffix}", self.prefix).into_bytes()
    }

    /// `{<prefix>x}:cn`: the conflict feed's last sequence number.
    pub(crate) fn conflict_counter(&self) -> Vec<u8> {
        self.global("cn")
    }

    /// `{<prefix>x}:cf`: the conflict feed, a stream with entry ids `<seq>-0`.
    pub(crate) fn conflict_feed(&self) -> Vec<u8> {
        self.global("cf")
    }

    /// `{<prefix>x}:layout`: "<partitions> <buckets>", fixed by the first store to connect.
    pub(crate) fn layout(&self) -> Vec<u8> {
        self.global("layout")
    }
}
