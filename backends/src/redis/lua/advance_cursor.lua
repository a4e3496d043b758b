-- Raises a replication cursor (never lowers it). Sequence numbers are compared as decimal
-- strings: they may exceed 2^53, where Lua's doubles lose precision.
-- KEYS: [1] cursors hash. ARGV: [1] origin, [2] seq (decimal, no leading zeros).
-- Returns the cursor after, as a decimal string.
local current = redis.call('HGET', KEYS[1], ARGV[1]) or '0'
local new = ARGV[2]
local greater = (#new > #current) or (#new == #current and new > current)
if greater then
  redis.call('HSET', KEYS[1], ARGV[1], new)
  return new
end
return current
