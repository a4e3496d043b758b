-- Reads a page of a partition's change feed with its bounds, in one atomic step.
-- KEYS: [1] partition counters hash, [2] feed stream.
-- ARGV: [1] first stream id to return ('' for none), [2] most entries, [3] feed entries kept
--       (Layout::feed_entries_max).
-- Returns {last seq, id of the oldest entry held (nil when empty), entries}.
--
-- The write script trims the stream approximately (`MAXLEN ~`: whole stream nodes at a time,
-- several times cheaper per write than removing the oldest entry on every write once the
-- feed is full), so the stream may hold a few more than ARGV[3] entries. Those older than the
-- newest ARGV[3] are hidden here, exactly as if they had been trimmed: readers see the bound.
local last = redis.call('HGET', KEYS[1], 's') or '0'
local keep = (tonumber(last) or 0) - tonumber(ARGV[3]) + 1
local low = '-'
if keep > 1 then
  low = string.format('%d-0', keep)
end
local oldest = redis.call('XRANGE', KEYS[2], low, '+', 'COUNT', '1')
local first = false
if #oldest > 0 then
  first = oldest[1][1]
end
local entries = {}
if ARGV[1] ~= '' then
  local start = ARGV[1]
  local wanted = tonumber(string.match(start, '^(%d+)')) or 0
  if keep > 1 and wanted < keep then
    start = low
  end
  entries = redis.call('XRANGE', KEYS[2], start, '+', 'COUNT', ARGV[2])
end
return {last, first, entries}
