-- Appends a record to the conflict feed, keeping the newest ARGV[2].
-- KEYS: [1] counter, [2] stream. ARGV: [1] record bytes, [2] records kept.
-- Returns the record's sequence number.
local seq = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], string.format('%d-0', seq), 'r', ARGV[1])
return seq
