-- Physically removes a key: value, meta, index entry and digest contribution.
-- KEYS: [1] value, [2] meta hash, [3] key index, [4] digest hash.
-- ARGV: [1] key, [2] digest bucket.
-- Returns 1 if the key held a value, 0 otherwise.
local existed = redis.call('EXISTS', KEYS[1])
local meta = redis.call('HGET', KEYS[2], ARGV[1])
if meta then
  digest_toggle(KEYS[4], ARGV[2], meta_entry(meta))
  redis.call('HDEL', KEYS[2], ARGV[1])
end
if existed == 1 then
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[3], ARGV[1])
return existed
