//! Redis key names: every key of a partition carries the partition's hash tag, so that one
//! script can touch the value, the feed and the digest even on Redis Cluster.

use crate::Key;

/// The key names of one store (one key prefix). The names of each partition's keys are built
/// once, when the store connects: a write names eight keys, and formatting them per write was
/// a measurable part of its client CPU.
#[derive(Clone)]
pub(crate) struct Names {
    prefix: String,
    parts: Box<[PartNames]>,
}

impl std::fmt::Debug for Names {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Names")
            .field("prefix", &self.prefix)
            .field("partitions", &self.parts.len())
            .finish()
    }
}

/// The names of one partition's keys.
#[derive(Clone, Debug)]
pub(crate) struct PartNames {
    tag: String,
    /// Everything before the key in a value's name.
    pub(crate) value_prefix: Vec<u8>,
    /// Everything before the bucket number in a meta hash's name.
    pub(crate) meta_prefix: Vec<u8>,
    pub(crate) index: Vec<u8>,
    pub(crate) tombstones: Vec<u8>,
    pub(crate) floor: Vec<u8>,
    pub(crate) digest: Vec<u8>,
    pub(crate) counters: Vec<u8>,
    pub(crate) feed: Vec<u8>,
    pub(crate) cursors: Vec<u8>,
}

impl PartNames {
    fn new(prefix: &str, partition: u16) -> Self {
        let tag = format!("{{{prefix}p{partition}}}");
        let name = |suffix: &str| {
            let mut name = Vec::with_capacity(tag.len() + 1 + suffix.len());
            name.extend_from_slice(tag.as_bytes());
            name.push(b':');
            name.extend_from_slice(suffix.as_bytes());
            name
        };
        Self {
            value_prefix: name("v:"),
            meta_prefix: name("m:"),
            index: name("i"),
            tombstones: name("t"),
            floor: name("fl"),
            digest: name("d"),
            counters: name("n"),
            feed: name("f"),
            cursors: name("c"),
            tag,
        }
    }

    /// `{..}:v:<key>`: the value's envelope (a string).
    pub(crate) fn value(&self, key: &Key) -> Vec<u8> {
        let key = key.as_str().as_bytes();
        let mut name = Vec::with_capacity(self.value_prefix.len() + key.len());
        name.extend_from_slice(&self.value_prefix);
        name.extend_from_slice(key);
        name
    }

    /// `{..}:m:<bucket>`: hash of key -> "<version> <commit token> <seq> <value hash><entry
    /// hash>".
    pub(crate) fn meta(&self, bucket: u16) -> Vec<u8> {
        let mut name = Vec::with_capacity(self.meta_prefix.len() + 5);
        name.extend_from_slice(&self.meta_prefix);
        push_decimal(&mut name, u64::from(bucket));
        name
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(&decimal(n));
}

/// A number's decimal digits, without allocating.
pub(crate) struct Decimal {
    digits: [u8; 20],
    at: usize,
}

impl std::ops::Deref for Decimal {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.digits[self.at..]
    }
}

/// `n` in decimal.
pub(crate) fn decimal(mut n: u64) -> Decimal {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { digits, at }
}

/// `n` as 16 lowercase hex digits.
pub(crate) fn hex16(n: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

impl Names {
    /// The names of a store with key prefix `prefix` and `partitions` partitions.
    pub(crate) fn new(prefix: &str, partitions: u16) -> Self {
        Self {
            prefix: prefix.to_string(),
            parts: (0..partitions).map(|p| PartNames::new(prefix, p)).collect(),
        }
    }

    /// The names of `partition`'s keys (built on the spot for a partition the layout does
    /// not have, which no key maps to).
    pub(crate) fn part(&self, partition: u16) -> std::borrow::Cow<'_, PartNames> {
        match self.parts.get(usize::from(partition)) {
            Some(names) => std::borrow::Cow::Borrowed(names),
            None => std::borrow::Cow::Owned(PartNames::new(&self.prefix, partition)),
        }
    }

    /// `{<prefix>p<partition>}`: the hash tag of a partition.
    pub(crate) fn tag(&self, partition: u16) -> String {
        self.part(partition).tag.clone()
    }

    /// Everything before the key in a value's name.
    pub(crate) fn value_prefix(&self, partition: u16) -> Vec<u8> {
        self.part(partition).value_prefix.clone()
    }

    /// `{..}:v:<key>`: the value's envelope (a string).
    pub(crate) fn value(&self, partition: u16, key: &Key) -> Vec<u8> {
        self.part(partition).value(key)
    }

    /// `{..}:m:<bucket>`: hash of key -> "<version> <commit token> <seq> <value hash><entry hash>".
    pub(crate) fn meta(&self, partition: u16, bucket: u16) -> Vec<u8> {
        self.part(partition).meta(bucket)
    }

    /// `{..}:i`: sorted set of the partition's keys (all scored 0, ordered by bytes).
    pub(crate) fn index(&self, partition: u16) -> Vec<u8> {
        self.part(partition).index.clone()
    }

    /// `{..}:t`: sorted set of the partition's tombstones (keys whose value holds no live dot),
    /// all scored 0, ordered by bytes.
    pub(crate) fn tombstones(&self, partition: u16) -> Vec<u8> {
        self.part(partition).tombstones.clone()
    }

    /// `{..}:fl`: the partition's dot floor, a hash of actor id -> highest counter of that
    /// actor in any value removed from the partition (decimal).
    pub(crate) fn floor(&self, partition: u16) -> Vec<u8> {
        self.part(partition).floor.clone()
    }

    /// `{..}:d`: hash of bucket -> fingerprint (16 hex digits; absent = 0).
    pub(crate) fn digest(&self, partition: u16) -> Vec<u8> {
        self.part(partition).digest.clone()
    }

    /// `{..}:n`: hash with the version clock `v` and the last feed seq `s`.
    pub(crate) fn counters(&self, partition: u16) -> Vec<u8> {
        self.part(partition).counters.clone()
    }

    /// `{..}:f`: the change feed, a stream with entry ids `<seq>-0`.
    pub(crate) fn feed(&self, partition: u16) -> Vec<u8> {
        self.part(partition).feed.clone()
    }

    /// `{..}:c`: hash of origin region -> replication cursor.
    pub(crate) fn cursors(&self, partition: u16) -> Vec<u8> {
        self.part(partition).cursors.clone()
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
