-- Test hook: stores bytes under a key exactly as given, bypassing every check, and keeps the
-- version, index and digest bookkeeping (a corrupt value still counts in the digest).
-- KEYS: [1] value, [2] meta hash, [3] key index, [4] digest hash, [5] partition counters,
--       [6] tombstone index.
-- ARGV: [1] key, [2] bytes, [3] value hash .. entry hash (32 hex digits), [4] digest bucket,
--       [5] '1' if the bytes decode to a tombstone, else '0'.
local meta = redis.call('HGET', KEYS[2], ARGV[1])
local version = redis.call('HINCRBY', KEYS[5], 'v', 1)
redis.call('SET', KEYS[1], ARGV[2])
if meta then
  digest_toggle(KEYS[4], ARGV[4], meta_entry(meta))
end
digest_toggle(KEYS[4], ARGV[4], string.sub(ARGV[3], -16))
redis.call('HSET', KEYS[2], ARGV[1], string.format('%d 0 0 ', version) .. ARGV[3])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
if ARGV[5] == '1' then
  redis.call('ZADD', KEYS[6], 0, ARGV[1])
else
  redis.call('ZREM', KEYS[6], ARGV[1])
end
return version
