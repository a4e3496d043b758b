-- Helpers shared by the geostate write scripts (prepended to each of them).
--
-- Digest fingerprints and entry hashes are 64-bit numbers. Lua numbers are doubles, so they
-- travel as 16 lowercase hex digits and are XOR-ed as two 32-bit halves with the bit library.
local ZERO16 = '0000000000000000'

local function xor16(a, b)
  local hi = bit.bxor(tonumber(string.sub(a, 1, 8), 16), tonumber(string.sub(b, 1, 8), 16))
  local lo = bit.bxor(tonumber(string.sub(a, 9, 16), 16), tonumber(string.sub(b, 9, 16), 16))
  return bit.tohex(hi, 8) .. bit.tohex(lo, 8)
end

-- XORs `entry` (16 hex digits) into the fingerprint of `bucket` in the digest hash `digest`.
local function digest_toggle(digest, bucket, entry)
  if entry == ZERO16 then
    return
  end
  local fp = redis.call('HGET', digest, bucket) or ZERO16
  fp = xor16(fp, entry)
  if fp == ZERO16 then
    redis.call('HDEL', digest, bucket)
  else
    redis.call('HSET', digest, bucket, fp)
  end
end

-- The entry hash recorded in a meta string "<version> <token> <seq> <value hash><entry hash>".
local function meta_entry(meta)
  return string.sub(meta, -16)
end
