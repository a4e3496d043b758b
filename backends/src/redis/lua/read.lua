-- Reads one key: its value bytes and its meta, in one atomic step; for a local write, also the
-- writer's entry of the partition's dot floor.
-- KEYS[1] value key, KEYS[2] meta hash of the key's bucket, [3] (optional) dot floor hash.
-- ARGV[1] the key, [2] (with KEYS[3]) the writer's actor id (decimal).
-- Returns {kind, bytes, meta, floor}: kind 0 = no value, 1 = a string value, 2 = a value of
-- another Redis type (not ours: reported as corrupt). bytes and meta are nil when absent;
-- floor is the writer's floor entry (decimal), nil when there is none or it was not asked for.
local t = redis.call('TYPE', KEYS[1])['ok']
local meta = redis.call('HGET', KEYS[2], ARGV[1])
local floor = false
if #KEYS >= 3 then
  floor = redis.call('HGET', KEYS[3], ARGV[2])
end
if t == 'none' then
  return {0, false, meta, floor}
end
if t ~= 'string' then
  return {2, false, meta, floor}
end
return {1, redis.call('GET', KEYS[1]), meta, floor}
