-- geostate PostgreSQL region store, schema version 2: garbage collection of tombstones.
--
-- A tombstone is a value that holds no live dot (deleted or cleared); it keeps its causal
-- context until it is causally stable, and is then purged. Purging (and physical deletion)
-- records the removed value's dots in the partition's dot floor, so that a later local write
-- to the key never mints one of them again.

-- Whether the value is a tombstone. Set by every write, in Rust, which decodes the value.
-- Values written before this migration read false until they are written again: such
-- tombstones are not listed for garbage collection (which is safe: they are merely kept).
ALTER TABLE gs_values ADD COLUMN tombstone boolean NOT NULL DEFAULT false;
-- tombstones(): a partition's tombstones in key order with version and value hash, from a
-- small partial index.
CREATE INDEX gs_values_tombstones ON gs_values (partition, key) INCLUDE (version, value_hash)
    WHERE tombstone;

-- Bumped by every purge and physical delete in the partition (in the same transaction that
-- raises the floor). A local write to an absent key reads it with the floor, and its write
-- statement updates the partition row only if it is unchanged: a removal that committed in
-- between makes the write start again (see backends/src/postgres/mod.rs).
ALTER TABLE gs_partitions ADD COLUMN floor_epoch bigint NOT NULL DEFAULT 0;

-- The dot floors: per partition and actor (bit for bit in a bigint, as elsewhere), the highest
-- counter of that actor in any value removed from the partition. Counters are unsigned 64-bit
-- numbers, hence numeric.
CREATE TABLE gs_dot_floors (
    partition  integer        NOT NULL,
    actor      bigint         NOT NULL,
    counter    numeric(20, 0) NOT NULL CHECK (counter > 0),
    PRIMARY KEY (partition, actor)
);
