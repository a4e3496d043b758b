//! The store's SQL, schema-qualified once per backend.
//!
//! Every statement names its tables as `"schema".table`, so the store never depends on a
//! connection's `search_path` (only migrations run with one). The schema name is checked by
//! [`super::config::check_schema_name`] before it is spliced in: it can hold nothing but
//! lowercase letters, digits and `_`.

use std::sync::Arc;

use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use sqlx::AssertSqlSafe;

/// The partition-row update every write starts with: the next version, the next feed
/// sequence number when `$7` is 1, and the feed trimmed to `$8` entries. `prev_trimmed`
/// returns where trimming stood before, so `t` deletes exactly the entries trimmed now.
///
/// Parameters: `$1` partition, `$2` key, `$3` bucket, `$4` envelope, `$5` value hash,
/// `$6` entry hash, `$7` 1 if fed else 0, `$8` feed entries kept, `$9` delta envelope (NULL
/// when not fed), `$10` origin actor, `$11` HLC milliseconds, `$12` HLC logical, `$13` XOR to
/// apply to the bucket fingerprint, `$14` the partition's `floor_epoch` as read with the dot
/// floor (a local write to an absent key; NULL otherwise), `$15` whether the new value is a
/// tombstone.
///
/// With `$14`, the partition row is updated only if its `floor_epoch` is unchanged: under
/// `READ COMMITTED` the `UPDATE` re-checks the condition on the newest row version after
/// waiting for its lock, so a purge or delete that committed since the floor was read leaves
/// `p` empty, and then nothing at all is written (every other part reads from `p`).
const WRITE_HEAD: &str = r#"
WITH p AS (
    UPDATE {s}.gs_partitions
       SET version_clock = version_clock + 1,
           last_seq = last_seq + $7,
           prev_trimmed = trimmed_through,
           trimmed_through = GREATEST(trimmed_through, last_seq + $7 - $8)
     WHERE partition = $1 AND ($14::bigint IS NULL OR floor_epoch = $14::bigint)
 RETURNING version_clock, last_seq, prev_trimmed, trimmed_through
), "#;

/// [`WRITE_HEAD`] conditional on the key's row holding version `$16` and an envelope whose
/// SHA-256 is `$17`: the compare-and-set of the optimistic write path. (The version alone
/// identifies what the store wrote; the hash also catches bytes changed behind the store's
/// back, which must never be overwritten.) `l` locks the key's row first (so locks are taken in the same
/// order as everywhere: key row, then partition row); under `READ COMMITTED`, a row that
/// another writer changed while we waited for its lock is re-checked on its newest version,
/// whose version is then another one (versions never repeat in a partition), and a deleted row
/// is skipped. Either way `l` is empty, `p` updates nothing, and nothing at all is written:
/// the statement returns no row.
const CAS_HEAD: &str = r#"
WITH l AS MATERIALIZED (
    SELECT 1 FROM {s}.gs_values
     WHERE key = $2 AND version = $16 AND sha256(envelope) = $17
       FOR UPDATE
), p AS (
    UPDATE {s}.gs_partitions
       SET version_clock = version_clock + 1,
           last_seq = last_seq + $7,
           prev_trimmed = trimmed_through,
           trimmed_through = GREATEST(trimmed_through, last_seq + $7 - $8)
     WHERE partition = $1 AND ($14::bigint IS NULL OR floor_epoch = $14::bigint)
       AND EXISTS (SELECT 1 FROM l)
 RETURNING version_clock, last_seq, prev_trimmed, trimmed_through
), "#;

/// The rest of every single-key write: the feed entry, the trim, and the digest bucket.
///
/// The bucket's fingerprint is XORed by a plain `UPDATE` (`d`); only a bucket that has no row
/// yet is inserted (`dn`, which keeps `ON CONFLICT` for a row another writer of the partition
/// committed after this statement's snapshot). `INSERT ... ON CONFLICT DO UPDATE` alone would
/// first lock the existing row, a WAL record of its own on every write.
const WRITE_TAIL: &str = r#",
f AS (
    INSERT INTO {s}.gs_feed (partition, seq, key, delta, origin, hlc_ms, hlc_logical)
    SELECT $1, p.last_seq, $2, $9, $10, $11, $12 FROM p WHERE $7 = 1
), t AS (
    DELETE FROM {s}.gs_feed AS e USING p
     WHERE e.partition = $1 AND e.seq > p.prev_trimmed AND e.seq <= p.trimmed_through
), d AS (
    UPDATE {s}.gs_digests AS g SET fingerprint = g.fingerprint # $13
      FROM p
     WHERE g.partition = $1 AND g.bucket = $3
 RETURNING 1
), dn AS (
    INSERT INTO {s}.gs_digests AS g (partition, bucket, fingerprint) SELECT $1, $3, $13 FROM p
     WHERE NOT EXISTS (SELECT 1 FROM d)
    ON CONFLICT (partition, bucket) DO UPDATE SET fingerprint = g.fingerprint # EXCLUDED.fingerprint
)
SELECT version_clock, last_seq FROM p"#;

const INSERT_VALUE: &str = r#"v AS (
    INSERT INTO {s}.gs_values
           (key, partition, bucket, envelope, version, value_hash, entry_hash, tombstone)
    SELECT $2, $1, $3, $4, p.version_clock, $5, $6, $15 FROM p
)"#;

const UPDATE_VALUE: &str = r#"v AS (
    UPDATE {s}.gs_values AS x
       SET envelope = $4, version = p.version_clock, value_hash = $5, entry_hash = $6,
           tombstone = $15
      FROM p
     WHERE x.key = $2
)"#;

/// Every statement of the store, for one schema.
#[derive(Debug)]
pub(crate) struct Sql {
    pub lock_value: Arc<str>,
    pub lock_value_for_write: Arc<str>,
    pub write_new: Arc<str>,
    pub write_existing: Arc<str>,
    pub write_cas: Arc<str>,
    pub write_many: Arc<str>,
    pub read_for_write: Arc<str>,
    pub read_many_for_write: Arc<str>,
    pub get: Arc<str>,
    pub get_many: Arc<str>,
    pub scan_ge: Arc<str>,
    pub scan_gt: Arc<str>,
    pub scan_ge_lt: Arc<str>,
    pub scan_gt_lt: Arc<str>,
    pub delete: Arc<str>,
    pub lock_values: Arc<str>,
    pub absent_floor: Arc<str>,
    pub raise_floors: Arc<str>,
    pub tombstones_first: Arc<str>,
    pub tombstones_after: Arc<str>,
    pub dot_floor: Arc<str>,
    pub read_feed: Arc<str>,
    pub trim_feed: Arc<str>,
    pub digest: Arc<str>,
    pub bucket_entries: Arc<str>,
    pub cursor: Arc<str>,
    pub advance_cursor: Arc<str>,
    pub append_conflict: Arc<str>,
    pub read_conflicts: Arc<str>,
    pub pin_layout: Arc<str>,
    pub read_layout: Arc<str>,
    pub init_partitions: Arc<str>,
    pub recompute_digest: Arc<str>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub raw_get: Arc<str>,
    #[cfg_attr(not(feature = "testing"), allow(dead_code))]
    pub raw_append_feed: Arc<str>,
}

impl Sql {
    /// The statements for `schema` (already checked by `check_schema_name`).
    pub fn new(schema: &str) -> Self {
        let ident = format!("\"{schema}\"");
        let s = |template: &str| -> Arc<str> { template.replace("{s}", &ident).into() };
        let scan = |condition: &str| {
            s(&format!(
                "SELECT key, envelope, version FROM {{s}}.gs_values WHERE {condition} \
                 ORDER BY key LIMIT $3"
            ))
        };
        Self {
            lock_value: s(
                "SELECT envelope, version, entry_hash FROM {s}.gs_values WHERE key = $1 FOR UPDATE",
            ),
            // `lock_value` for a local write to key $1 of partition $2 by actor $3: also the
            // writer's dot floor (NULL: none), in the same statement.
            // `lock_value` for a local write to key $1 of partition $2 by actor $3: also the
            // writer's dot floor (NULL: none) and the partition's floor epoch, read in the same
            // statement (one snapshot), for the write cache.
            lock_value_for_write: s(r#"
SELECT v.envelope, v.version, v.entry_hash,
       (SELECT f.counter::text FROM {s}.gs_dot_floors AS f
         WHERE f.partition = $2 AND f.actor = $3),
       (SELECT p.floor_epoch FROM {s}.gs_partitions AS p WHERE p.partition = $2)
  FROM {s}.gs_values AS v WHERE v.key = $1 FOR UPDATE OF v"#),
            write_new: s(&format!("{WRITE_HEAD}{INSERT_VALUE}{WRITE_TAIL}")),
            write_existing: s(&format!("{WRITE_HEAD}{UPDATE_VALUE}{WRITE_TAIL}")),
            write_cas: s(&format!("{CAS_HEAD}{UPDATE_VALUE}{WRITE_TAIL}")),
            // The optimistic write of many existing keys (distinct) in one statement: item k of
            // the arrays is written only if its key still holds version $16[k] with an envelope
            // hashing to $17[k] (locked in key order, as `write_cas` does for one key) and, for
            // a local write ($14[k] not NULL), its partition's floor epoch is still $14[k]
            // (partition rows locked in partition order after every key row). The items written
            // get the next versions and feed sequence numbers of their partitions in item
            // order; the feed of each partition is trimmed to $8 entries (never more items of
            // one partition than that in one statement) and every bucket's fingerprint XORed
            // once (an `UPDATE`, then an insert of the buckets that have no row yet, as in
            // `WRITE_TAIL`). Returns (item number, version, seq or NULL) of the items written.
            write_many: s(r#"
WITH i AS (
    SELECT * FROM unnest($1::integer[], $2::text[], $3::integer[], $4::bytea[], $5::bigint[],
                         $6::bigint[], $7::integer[], $9::bytea[], $10::bigint[], $11::bigint[],
                         $12::bigint[], $13::bigint[], $14::bigint[], $15::boolean[],
                         $16::bigint[], $17::bytea[])
           WITH ORDINALITY AS i(partition, key, bucket, envelope, value_hash, entry_hash, fed,
                                delta, origin, hlc_ms, hlc_logical, xor, epoch, tombstone,
                                expected, sha, n)
), l AS MATERIALIZED (
    SELECT x.key FROM {s}.gs_values AS x JOIN i ON i.key = x.key
     WHERE x.version = i.expected AND sha256(x.envelope) = i.sha
     ORDER BY x.key
       FOR UPDATE OF x
), pl AS MATERIALIZED (
    SELECT g.partition, g.floor_epoch FROM {s}.gs_partitions AS g
     WHERE g.partition IN (SELECT i.partition FROM i JOIN l ON l.key = i.key)
     ORDER BY g.partition
       FOR UPDATE
), w AS MATERIALIZED (
    SELECT i.*,
           row_number() OVER (PARTITION BY i.partition ORDER BY i.n) AS vr,
           sum(i.fed) OVER (PARTITION BY i.partition ORDER BY i.n) AS sr
      FROM i JOIN l ON l.key = i.key JOIN pl ON pl.partition = i.partition
     WHERE i.epoch IS NULL OR i.epoch = pl.floor_epoch
), c AS (
    SELECT partition, count(*) AS nv, sum(fed) AS ns FROM w GROUP BY partition
), p AS (
    UPDATE {s}.gs_partitions AS g
       SET version_clock = g.version_clock + c.nv,
           last_seq = g.last_seq + c.ns,
           prev_trimmed = g.trimmed_through,
           trimmed_through = GREATEST(g.trimmed_through, g.last_seq + c.ns - $8)
      FROM c
     WHERE g.partition = c.partition
 RETURNING g.partition, g.version_clock - c.nv AS v0, g.last_seq - c.ns AS s0,
           g.prev_trimmed, g.trimmed_through
), v AS (
    UPDATE {s}.gs_values AS x
       SET envelope = w.envelope, version = p.v0 + w.vr, value_hash = w.value_hash,
           entry_hash = w.entry_hash, tombstone = w.tombstone
      FROM w JOIN p ON p.partition = w.partition
     WHERE x.key = w.key
), f AS (
    INSERT INTO {s}.gs_feed (partition, seq, key, delta, origin, hlc_ms, hlc_logical)
    SELECT w.partition, p.s0 + w.sr, w.key, w.delta, w.origin, w.hlc_ms, w.hlc_logical
      FROM w JOIN p ON p.partition = w.partition
     WHERE w.fed = 1
), t AS (
    DELETE FROM {s}.gs_feed AS e USING p
     WHERE e.partition = p.partition AND e.seq > p.prev_trimmed AND e.seq <= p.trimmed_through
), dx AS MATERIALIZED (
    SELECT w.partition, w.bucket, bit_xor(w.xor) AS xor
      FROM w JOIN p ON p.partition = w.partition
     GROUP BY w.partition, w.bucket
), d AS (
    UPDATE {s}.gs_digests AS g SET fingerprint = g.fingerprint # dx.xor
      FROM dx
     WHERE g.partition = dx.partition AND g.bucket = dx.bucket
 RETURNING g.partition, g.bucket
), dn AS (
    INSERT INTO {s}.gs_digests AS g (partition, bucket, fingerprint)
    SELECT dx.partition, dx.bucket, dx.xor FROM dx
     WHERE NOT EXISTS (SELECT 1 FROM d WHERE d.partition = dx.partition AND d.bucket = dx.bucket)
    ON CONFLICT (partition, bucket) DO UPDATE SET fingerprint = g.fingerprint # EXCLUDED.fingerprint
)
SELECT w.n, p.v0 + w.vr, CASE WHEN w.fed = 1 THEN p.s0 + w.sr END
  FROM w JOIN p ON p.partition = w.partition"#),
            // What an optimistic write to key $1 of partition $2 starts from, in one snapshot,
            // without a transaction or a lock: the partition's floor epoch, actor $3's dot
            // floor (NULL: none, or no actor: a merge), and the key's row if there is one.
            read_for_write: s(r#"
SELECT p.floor_epoch,
       (SELECT f.counter::text FROM {s}.gs_dot_floors AS f
         WHERE f.partition = $2 AND f.actor = $3::bigint),
       v.envelope, v.version, v.entry_hash
  FROM {s}.gs_partitions AS p
  LEFT JOIN {s}.gs_values AS v ON v.key = $1
 WHERE p.partition = $2"#),
            // `read_for_write` for the keys of the array $1 that exist, by actor $2 (NULL: a
            // merge), in one snapshot: what a batch's writes start from.
            read_many_for_write: s(r#"
SELECT v.key, v.envelope, v.version, v.entry_hash, p.floor_epoch,
       (SELECT f.counter::text FROM {s}.gs_dot_floors AS f
         WHERE f.partition = v.partition AND f.actor = $2::bigint)
  FROM {s}.gs_values AS v
  JOIN {s}.gs_partitions AS p ON p.partition = v.partition
 WHERE v.key = ANY($1)"#),
            get: s("SELECT envelope, version FROM {s}.gs_values WHERE key = $1"),
            get_many: s("SELECT key, envelope, version FROM {s}.gs_values WHERE key = ANY($1)"),
            // $1 lower bound, $2 upper bound (exclusive; unused without one), $3 limit.
            scan_ge: scan("key >= $1 AND $2::text IS NULL"),
            scan_gt: scan("key > $1 AND $2::text IS NULL"),
            scan_ge_lt: scan("key >= $1 AND key < $2"),
            scan_gt_lt: scan("key > $1 AND key < $2"),
            // Deletes the keys of the array $1 and XORs their entry hashes out of their
            // buckets. Runs in a purge's or delete's transaction after `lock_values` or
            // `lock_value` locked the rows and `raise_floors` their partitions' rows (in
            // partition order), so two removals that share a digest row are serialised on its
            // partition's row before they reach it.
            delete: s(r#"
WITH d AS (
    DELETE FROM {s}.gs_values WHERE key = ANY($1) RETURNING key, partition, bucket, entry_hash
), x AS (
    SELECT partition, bucket, bit_xor(entry_hash) AS xor FROM d GROUP BY partition, bucket
), u AS (
    UPDATE {s}.gs_digests AS g SET fingerprint = g.fingerprint # x.xor
      FROM x WHERE g.partition = x.partition AND g.bucket = x.bucket
)
SELECT key FROM d"#),
            // The rows a physical delete removes, locked in key order, with what the dot
            // floor needs.
            lock_values: s(
                "SELECT key, partition, envelope FROM {s}.gs_values WHERE key = ANY($1) \
                 ORDER BY key FOR UPDATE",
            ),
            // What a local write to an absent key of partition $1 by actor $2 starts from, in
            // one snapshot: the partition's floor epoch and the actor's floor (NULL: none).
            absent_floor: s(r#"
SELECT p.floor_epoch,
       (SELECT f.counter::text FROM {s}.gs_dot_floors AS f
         WHERE f.partition = $1 AND f.actor = $2)
  FROM {s}.gs_partitions AS p
 WHERE p.partition = $1"#),
            // Bumps the floor epochs of the partitions $1 (locking their rows in partition
            // order) and raises their dot floors to at least ($2 partition, $3 actor,
            // $4 counter as decimal text) rows, which name each (partition, actor) once.
            raise_floors: s(r#"
WITH p AS (
    UPDATE {s}.gs_partitions SET floor_epoch = floor_epoch + 1
     WHERE partition IN (
           SELECT partition FROM {s}.gs_partitions WHERE partition = ANY($1)
            ORDER BY partition FOR UPDATE)
 RETURNING partition
)
INSERT INTO {s}.gs_dot_floors AS f (partition, actor, counter)
SELECT u.partition, u.actor, u.counter::numeric
  FROM unnest($2::integer[], $3::bigint[], $4::text[]) AS u(partition, actor, counter)
 WHERE u.partition IN (SELECT partition FROM p)
 ORDER BY u.partition, u.actor
ON CONFLICT (partition, actor) DO UPDATE SET counter = GREATEST(f.counter, EXCLUDED.counter)"#),
            // $1 partition, $2 limit, $3 the key to list after. The partial index
            // `gs_values_tombstones` gives the keys in order; versions and value hashes come
            // from the heap (not INCLUDEd in the index, so that writes stay HOT: migration 3).
            tombstones_first: s("SELECT key, version, value_hash FROM {s}.gs_values \
                 WHERE partition = $1 AND tombstone ORDER BY key LIMIT $2"),
            tombstones_after: s("SELECT key, version, value_hash FROM {s}.gs_values \
                 WHERE partition = $1 AND tombstone AND key > $3 ORDER BY key LIMIT $2"),
            dot_floor: s("SELECT actor, counter::text FROM {s}.gs_dot_floors WHERE partition = $1"),
            // One statement, so the bounds and the entries come from one snapshot.
            read_feed: s(r#"
SELECT p.last_seq, p.trimmed_through, e.seq, e.key, e.delta, e.origin, e.hlc_ms, e.hlc_logical
  FROM {s}.gs_partitions AS p
  LEFT JOIN LATERAL (
        SELECT seq, key, delta, origin, hlc_ms, hlc_logical FROM {s}.gs_feed
         WHERE partition = $1 AND seq > $2 ORDER BY seq LIMIT $3
  ) AS e ON true
 WHERE p.partition = $1
 ORDER BY e.seq"#),
            trim_feed: s(r#"
WITH p AS (
    UPDATE {s}.gs_partitions
       SET prev_trimmed = trimmed_through,
           trimmed_through = GREATEST(trimmed_through, LEAST($2, last_seq))
     WHERE partition = $1
 RETURNING prev_trimmed, trimmed_through
), d AS (
    DELETE FROM {s}.gs_feed AS e USING p
     WHERE e.partition = $1 AND e.seq > p.prev_trimmed AND e.seq <= p.trimmed_through
 RETURNING 1
)
SELECT count(*) FROM d"#),
            digest: s("SELECT bucket, fingerprint FROM {s}.gs_digests WHERE partition = $1"),
            // `gs_values_bucket` gives the bucket's keys in order; the value hashes come from
            // the heap (not INCLUDEd in the index, so that writes stay HOT: migration 3).
            // Only anti-entropy lists buckets, far less often than writes happen.
            bucket_entries: s(
                "SELECT key, value_hash FROM {s}.gs_values WHERE partition = $1 AND bucket = $2 \
                 ORDER BY key",
            ),
            cursor: s("SELECT seq FROM {s}.gs_cursors WHERE origin = $1 AND partition = $2"),
            advance_cursor: s(r#"
INSERT INTO {s}.gs_cursors AS c (origin, partition, seq) VALUES ($1, $2, $3)
ON CONFLICT (origin, partition) DO UPDATE SET seq = GREATEST(c.seq, EXCLUDED.seq)
RETURNING seq"#),
            // The counter row serialises appends: sequence numbers are contiguous and in
            // commit order, so a reader resuming "after" a number never skips a record.
            append_conflict: s(r#"
WITH c AS (
    UPDATE {s}.gs_conflict_log SET last_seq = last_seq + 1 RETURNING last_seq
), i AS (
    INSERT INTO {s}.gs_conflicts (seq, record) SELECT last_seq, $1 FROM c
), d AS (
    DELETE FROM {s}.gs_conflicts WHERE seq = (SELECT last_seq FROM c) - $2
)
SELECT last_seq FROM c"#),
            read_conflicts: s(
                "SELECT seq, record FROM {s}.gs_conflicts WHERE seq > $1 ORDER BY seq LIMIT $2",
            ),
            pin_layout: s(
                "INSERT INTO {s}.gs_meta (id, partitions, buckets) VALUES (true, $1, $2) \
                 ON CONFLICT (id) DO NOTHING",
            ),
            read_layout: s("SELECT partitions, buckets FROM {s}.gs_meta"),
            init_partitions: s(
                "INSERT INTO {s}.gs_partitions (partition) SELECT generate_series(0, $1 - 1) \
                 ON CONFLICT (partition) DO NOTHING",
            ),
            // The fingerprints recomputed from the stored entry hashes (for verification).
            recompute_digest: s(
                "SELECT bucket, bit_xor(entry_hash) FROM {s}.gs_values WHERE partition = $1 \
                 GROUP BY bucket",
            ),
            raw_get: s("SELECT envelope FROM {s}.gs_values WHERE key = $1"),
            raw_append_feed: s(r#"
WITH p AS (
    UPDATE {s}.gs_partitions SET last_seq = last_seq + 1 WHERE partition = $1
 RETURNING last_seq
)
INSERT INTO {s}.gs_feed (partition, seq, key, delta, origin, hlc_ms, hlc_logical)
SELECT $1, p.last_seq, $2, $3, 0, 0, 0 FROM p
RETURNING seq"#),
        }
    }
}

/// A query of one of the statements above.
pub(crate) fn query(sql: &Arc<str>) -> Query<'static, Postgres, PgArguments> {
    sqlx::query(AssertSqlSafe(Arc::clone(sql)))
}
