-- Reads a page of a partition's change feed with its bounds, in one atomic step.
-- KEYS: [1] partition counters hash, [2] feed stream.
-- ARGV: [1] first stream id to return ('' for none), [2] most entries.
-- Returns {last seq, id of the oldest entry held (nil when empty), entries}.
local last = redis.call('HGET', KEYS[1], 's') or '0'
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)
local first = false
if #oldest > 0 then
  first = oldest[1][1]
end
local entries = {}
if ARGV[1] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {last, first, entries}
