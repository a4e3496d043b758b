-- Reads one key: its value bytes and its meta, in one atomic step.
-- KEYS[1] value key, KEYS[2] meta hash of the key's bucket.
-- ARGV[1] the key.
-- Returns {kind, bytes, meta}: kind 0 = no value, 1 = a string value, 2 = a value of another
-- Redis type (not ours: reported as corrupt). bytes and meta are nil when absent.
local t = redis.call('TYPE', KEYS[1])['ok']
local meta = redis.call('HGET', KEYS[2], ARGV[1])
if t == 'none' then
  return {0, false, meta}
end
if t ~= 'string' then
  return {2, false, meta}
end
return {1, redis.call('GET', KEYS[1]), meta}
