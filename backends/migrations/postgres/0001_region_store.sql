-- geostate PostgreSQL region store, schema version 1.
--
-- Runs with search_path set to the store's schema (see backends/src/postgres/mod.rs), so the
-- names below are created there. Keys are compared bytewise (COLLATE "C"), which for UTF-8 is
-- the order of Rust's `str`. Unsigned 64-bit numbers that are hashes or actor ids are stored
-- bit for bit in bigint columns (they may read negative in psql); versions, sequence numbers
-- and cursors are always below 2^63.

-- The layout the schema was created with: partition and digest bucket counts never change.
CREATE TABLE gs_meta (
    id          boolean     PRIMARY KEY DEFAULT true CHECK (id),
    partitions  integer     NOT NULL CHECK (partitions BETWEEN 1 AND 4096),
    buckets     integer     NOT NULL CHECK (buckets BETWEEN 1 AND 4096),
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- One row per partition: the version clock (every write takes the next value, so versions
-- never repeat in a partition), the change feed's newest sequence number, and how far the feed
-- has been trimmed (entries trimmed_through + 1 ..= last_seq are held). prev_trimmed is
-- trimmed_through as it was before the last update of the row, so one statement can delete
-- exactly the entries that update trimmed. Updated by every write: the row lock orders the
-- partition's feed entries in commit order.
CREATE TABLE gs_partitions (
    partition        integer PRIMARY KEY CHECK (partition >= 0),
    version_clock    bigint  NOT NULL DEFAULT 0,
    last_seq         bigint  NOT NULL DEFAULT 0,
    trimmed_through  bigint  NOT NULL DEFAULT 0,
    prev_trimmed     bigint  NOT NULL DEFAULT 0,
    CHECK (0 <= prev_trimmed AND prev_trimmed <= trimmed_through AND trimmed_through <= last_seq)
) WITH (fillfactor = 50);

-- Values: the envelope bytes, the region-local version, and the value's digest contribution
-- (value_hash = FNV-1a 64 of the canonical payload, entry_hash = digest::entry_hash(key,
-- value_hash); for bytes that do not decode, value_hash = digest::raw_hash(bytes)).
CREATE TABLE gs_values (
    key         text COLLATE "C" PRIMARY KEY,
    partition   integer NOT NULL,
    bucket      integer NOT NULL,
    envelope    bytea   NOT NULL,
    version     bigint  NOT NULL CHECK (version > 0),
    value_hash  bigint  NOT NULL,
    entry_hash  bigint  NOT NULL
);
-- Envelopes above 4 KiB are zstd-compressed already: keep them out of line, uncompressed.
ALTER TABLE gs_values ALTER COLUMN envelope SET STORAGE EXTERNAL;
-- bucket_entries: a bucket's keys in key order, with their value hashes, from the index alone.
CREATE INDEX gs_values_bucket ON gs_values (partition, bucket, key) INCLUDE (value_hash);

-- The change feed: local writes only, numbered 1, 2, 3, ... per partition.
CREATE TABLE gs_feed (
    partition    integer NOT NULL,
    seq          bigint  NOT NULL CHECK (seq > 0),
    key          text COLLATE "C" NOT NULL,
    delta        bytea   NOT NULL,
    origin       bigint  NOT NULL,
    hlc_ms       bigint  NOT NULL,
    hlc_logical  bigint  NOT NULL,
    PRIMARY KEY (partition, seq)
);
ALTER TABLE gs_feed ALTER COLUMN delta SET STORAGE EXTERNAL;

-- Digest bucket fingerprints: XOR of the entry hashes of the bucket's keys. A missing row is
-- a fingerprint of 0.
CREATE TABLE gs_digests (
    partition    integer NOT NULL,
    bucket       integer NOT NULL,
    fingerprint  bigint  NOT NULL DEFAULT 0,
    PRIMARY KEY (partition, bucket)
) WITH (fillfactor = 50);

-- Replication cursors: (origin region, partition) -> last applied sequence number.
CREATE TABLE gs_cursors (
    origin     text COLLATE "C" NOT NULL,
    partition  integer NOT NULL,
    seq        bigint  NOT NULL CHECK (seq >= 0),
    PRIMARY KEY (origin, partition)
);

-- The conflict feed: encoded conflict records, numbered 1, 2, 3, ... in commit order (the
-- counter row serialises appends), the oldest dropped beyond a bound.
CREATE TABLE gs_conflict_log (
    id        boolean PRIMARY KEY DEFAULT true CHECK (id),
    last_seq  bigint  NOT NULL DEFAULT 0
);
INSERT INTO gs_conflict_log DEFAULT VALUES;

CREATE TABLE gs_conflicts (
    seq     bigint PRIMARY KEY,
    record  bytea  NOT NULL
);
