-- geostate PostgreSQL region store, schema version 3: value updates that can be HOT.
--
-- Every write updates its key's row in gs_values. PostgreSQL makes such an update a HOT
-- (heap-only tuple) update, which touches no index, only when no indexed column changes
-- (key columns, INCLUDE columns and partial-index predicate columns all count) and the new row
-- version fits on the same page. Versions 1 and 2 carried value_hash (and version) as INCLUDE
-- columns of the secondary indexes, so that anti-entropy and the tombstone listing could be
-- answered from the indexes alone; but value_hash and version change with every write, so no
-- value update was ever HOT: each one inserted an entry into the primary key index and into
-- gs_values_bucket (and into gs_values_tombstones for a tombstone), a large part of a write's
-- WAL. Without them, an update changes no indexed column unless it flips the tombstone flag
-- (the predicate column of gs_values_tombstones): only deletions, clears and revivals then
-- still update the indexes.
--
-- The price: bucket_entries() and tombstones() now read each listed row from the heap. Both
-- serve anti-entropy and garbage collection, which are rare and batched next to the writes.

-- bucket_entries(): a bucket's keys in key order (value hashes from the heap).
DROP INDEX gs_values_bucket;
CREATE INDEX gs_values_bucket ON gs_values (partition, bucket, key);

-- tombstones(): a partition's tombstones in key order (versions and value hashes from the heap).
DROP INDEX gs_values_tombstones;
CREATE INDEX gs_values_tombstones ON gs_values (partition, key) WHERE tombstone;

-- Room on every page for the next version of its rows, so that updates stay on their page (a
-- HOT update needs that too). Applies to pages filled from now on: an existing table is not
-- rewritten here (that would lock it for the length of the rewrite); its full pages make room
-- as old row versions are pruned.
ALTER TABLE gs_values SET (fillfactor = 80);
