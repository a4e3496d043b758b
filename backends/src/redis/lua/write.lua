-- Commits writes computed by the client from snapshots (optimistic concurrency): one or more
-- items per call, each checked and committed on its own (one call amortises the fixed cost of
-- a script call, several microseconds of server time, over a wave of writes).
-- Per item, 8 KEYS and 18 ARGV, item i's at offsets 8i and 18i:
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
-- Returns one reply per item: {'ok', version, seq (0 when not fed)}, {'err', message} when a
-- command failed (the item's writes before it stay: nothing in our keys makes a command fail
-- but a key of the wrong type, a damaged store), or {'race'} when the key changed since the
-- snapshot or, for a write computed for an absent key, when the writer's dot floor changed (a
-- purge or delete in the partition raised it, maybe after removing this very key: the write
-- may have been computed below the new floor); nothing is written then. A resend of a commit
-- that already ran (a client that lost the reply and sent it again) finds its own token in the
-- meta and returns the first outcome.
--
-- Every redis.call costs about a microsecond of server time beyond the command itself, so the
-- script makes as few as it can: the value is recognised by its checksum alone (any change to
-- an envelope changes its last four bytes, but for one chance in 2^32), the key index is
-- touched only when the key is new, and the digest bucket moves once. Numbers passed to
-- redis.call are written as strings: a Lua number is turned into text by printf("%.14g"), a
-- visible cost in a profile of the server.
local function commit(k, a)
  local meta = redis.call('HGET', KEYS[k + 2], ARGV[a + 1]) or ''
  if meta ~= ARGV[a + 2] then
    local version, token, seq = string.match(meta, '^(%d+) (%x+) (%d+) ')
    if token ~= nil and token == ARGV[a + 14] then
      return {'ok', version, seq}
    end
    return {'race'}
  end
  local absent = ARGV[a + 3] == '-1'
  if absent then
    if redis.call('EXISTS', KEYS[k + 1]) == 1 then
      return {'race'}
    end
    if ARGV[a + 16] ~= '' and (redis.call('HGET', KEYS[k + 8], ARGV[a + 16]) or '') ~= ARGV[a + 17] then
      return {'race'}
    end
  else
    -- A value of another Redis type makes GETRANGE fail: not what was read either.
    local tail = redis.pcall('GETRANGE', KEYS[k + 1], '-4', '-1')
    if type(tail) ~= 'string' or tail ~= ARGV[a + 4] then
      return {'race'}
    end
  end
  local version = redis.call('HINCRBY', KEYS[k + 5], 'v', '1')
  redis.call('SET', KEYS[k + 1], ARGV[a + 5])
  digest_toggle(KEYS[k + 4], ARGV[a + 7], ARGV[a + 18])
  local seq = 0
  if ARGV[a + 8] == '1' then
    seq = redis.call('HINCRBY', KEYS[k + 5], 's', '1')
    -- Trimmed approximately, by whole stream nodes: removing the oldest entry on every write
    -- of a full feed cost more than the rest of XADD (read_feed hides what is left over).
    redis.call('XADD', KEYS[k + 6], 'MAXLEN', '~', ARGV[a + 9], string.format('%d-0', seq),
      'k', ARGV[a + 1], 'd', ARGV[a + 10], 'a', ARGV[a + 11], 'p', ARGV[a + 12], 'l', ARGV[a + 13])
  end
  redis.call('HSET', KEYS[k + 2], ARGV[a + 1],
    string.format('%d %s %d ', version, ARGV[a + 14], seq) .. ARGV[a + 6])
  if absent then
    redis.call('ZADD', KEYS[k + 3], '0', ARGV[a + 1])
  end
  if string.sub(ARGV[a + 15], 2, 2) == '1' then
    redis.call('ZADD', KEYS[k + 7], '0', ARGV[a + 1])
  elseif string.sub(ARGV[a + 15], 1, 1) == '1' then
    redis.call('ZREM', KEYS[k + 7], ARGV[a + 1])
  end
  return {'ok', version, seq}
end

local replies = {}
for i = 0, #KEYS / 8 - 1 do
  local ok, reply = pcall(commit, i * 8, i * 18)
  if not ok then
    if type(reply) == 'table' and reply.err ~= nil then
      reply = reply.err
    end
    reply = {'err', tostring(reply)}
  end
  replies[i + 1] = reply
end
return replies
