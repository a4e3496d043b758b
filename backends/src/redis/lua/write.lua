-- Commits one write computed by the client from a snapshot (optimistic concurrency).
-- KEYS: [1] value, [2] meta hash of the bucket, [3] key index (sorted set), [4] digest hash,
--       [5] partition counters hash (v: version clock, s: last feed seq), [6] feed stream,
--       [7] tombstone index (sorted set), [8] dot floor hash.
-- ARGV: [1] key, [2] meta seen ('' when none), [3] '-1' when the key held no value, else '',
--       [4] last 4 bytes of the value seen (its envelope's checksum), [5] new value bytes,
--       [6] value hash .. entry hash of the new value (32 hex digits), [7] digest bucket,
--       [8] '1' to append to the feed, [9] feed entries kept, [10] delta envelope,
--       [11] origin actor, [12] HLC physical ms, [13] HLC logical, [14] commit token
--       (16 hex digits, random per attempt), [15] tombstone flags: two characters, whether the
--       value seen was a tombstone and whether the new value is one ('0'/'1' each),
--       [16] the writer's actor id when the write was computed for an absent key from the
--       dot floor ('' otherwise), [17] the writer's floor entry seen ('' when none),
--       [18] what the bucket's fingerprint changes by: the entry hash of the meta seen (if
--       any) XOR the new entry hash (16 hex digits; the client knows both).
-- Returns {'ok', version, seq (0 when not fed)}, or {'race'} when the key changed since the
-- snapshot or, for a write computed for an absent key, when the writer's dot floor changed (a
-- purge or delete in the partition raised it, maybe after removing this very key: the write
-- may have been computed below the new floor); nothing is written then. A resend of a commit
-- that already ran (a client that lost the reply and sent it again) finds its own token in the
-- meta and returns the first outcome.
--
-- Every redis.call costs about a microsecond of server time beyond the command itself, so the
-- script makes as few as it can: the value is recognised by its checksum alone (any change to
-- an envelope changes its last four bytes, but for one chance in 2^32), the key index is
-- touched only when the key is new, and the digest bucket moves once.
local meta = redis.call('HGET', KEYS[2], ARGV[1]) or ''
if meta ~= ARGV[2] then
  local version, token, seq = string.match(meta, '^(%d+) (%x+) (%d+) ')
  if token ~= nil and token == ARGV[14] then
    return {'ok', version, seq}
  end
  return {'race'}
end
local absent = ARGV[3] == '-1'
if absent then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return {'race'}
  end
  if ARGV[16] ~= '' and (redis.call('HGET', KEYS[8], ARGV[16]) or '') ~= ARGV[17] then
    return {'race'}
  end
else
  -- A value of another Redis type makes GETRANGE fail: not what was read either.
  local tail = redis.pcall('GETRANGE', KEYS[1], -4, -1)
  if type(tail) ~= 'string' or tail ~= ARGV[4] then
    return {'race'}
  end
end
local version = redis.call('HINCRBY', KEYS[5], 'v', 1)
redis.call('SET', KEYS[1], ARGV[5])
digest_toggle(KEYS[4], ARGV[7], ARGV[18])
local seq = 0
if ARGV[8] == '1' then
  seq = redis.call('HINCRBY', KEYS[5], 's', 1)
  redis.call('XADD', KEYS[6], 'MAXLEN', ARGV[9], string.format('%d-0', seq),
    'k', ARGV[1], 'd', ARGV[10], 'a', ARGV[11], 'p', ARGV[12], 'l', ARGV[13])
end
redis.call('HSET', KEYS[2], ARGV[1],
  string.format('%d %s %d ', version, ARGV[14], seq) .. ARGV[6])
if absent then
  redis.call('ZADD', KEYS[3], 0, ARGV[1])
end
if string.sub(ARGV[15], 2, 2) == '1' then
  redis.call('ZADD', KEYS[7], 0, ARGV[1])
elseif string.sub(ARGV[15], 1, 1) == '1' then
  redis.call('ZREM', KEYS[7], ARGV[1])
end
return {'ok', version, seq}
