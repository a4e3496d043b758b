-- Deletes up to ARGV[1] keys of one partition, starting with the values listed in its index;
-- once the index is empty, deletes the partition's bookkeeping keys (KEYS[2..]).
-- KEYS: [1] key index, [2..] meta hashes, digest, counters, feed, cursors.
-- ARGV: [1] batch size, [2] value key prefix of the partition ('{...}:v:').
-- Returns the number of keys deleted; 0 means the partition is clean.
local batch = tonumber(ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, batch - 1)
if #members > 0 then
  for _, member in ipairs(members) do
    redis.call('DEL', ARGV[2] .. member)
  end
  redis.call('ZREM', KEYS[1], unpack(members))
  return #members
end
local deleted = 0
for i = 1, #KEYS do
  deleted = deleted + redis.call('DEL', KEYS[i])
end
return deleted
