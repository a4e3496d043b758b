-- Physically removes a key (value, meta, index entries, digest contribution) if it still holds
-- exactly what the client read, and raises the partition's dot floor by the maxima of the
-- removed value's causal context, which the client computed from that read (Lua cannot decode
-- an envelope). Serves both delete and the garbage collection of tombstones.
-- KEYS: [1] value, [2] meta hash of the bucket, [3] key index, [4] digest hash,
--       [5] tombstone index, [6] dot floor hash.
-- ARGV: [1] key, [2] digest bucket, [3] meta seen ('' when none), [4] length of the value seen
--       (-1: no value, -2: a value of another Redis type than string), [5] last 4 bytes of the
--       value seen, [6..] the floor raise: actor id, counter, actor id, counter, ... (decimal).
-- Returns 1 if the key held a value, 0 if not, -1 if the key changed since it was read
-- (nothing removed).
local meta = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if meta ~= ARGV[3] then
  return -1
end
local t = redis.call('TYPE', KEYS[1])['ok']
if ARGV[4] == '-1' then
  if t ~= 'none' then
    return -1
  end
elseif ARGV[4] == '-2' then
  if t == 'none' or t == 'string' then
    return -1
  end
else
  if t ~= 'string' then
    return -1
  end
  if redis.call('STRLEN', KEYS[1]) ~= tonumber(ARGV[4]) then
    return -1
  end
  if redis.call('GETRANGE', KEYS[1], '-4', '-1') ~= ARGV[5] then
    return -1
  end
end
if meta ~= '' then
  digest_toggle(KEYS[4], ARGV[2], meta_entry(meta))
  redis.call('HDEL', KEYS[2], ARGV[1])
end
local existed = 0
if t ~= 'none' then
  redis.call('DEL', KEYS[1])
  existed = 1
end
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
-- Counters are compared as decimal strings (no leading zeros): they may exceed 2^53, where
-- Lua's doubles lose precision.
for i = 6, #ARGV - 1, 2 do
  local new = ARGV[i + 1]
  local current = redis.call('HGET', KEYS[6], ARGV[i]) or '0'
  if (#new > #current) or (#new == #current and new > current) then
    redis.call('HSET', KEYS[6], ARGV[i], new)
  end
end
return existed
