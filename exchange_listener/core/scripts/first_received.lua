-- The earliest receipt of any copy of one mail (workers.jobs).
-- KEYS: first_received
-- ARGV: received_at, ttl
-- received_at: epoch seconds of this copy. Returns the earliest; the key lives at least ``ttl``
-- seconds from now (a TTL is only ever extended).
local cur = redis.call('GET', KEYS[1])
local ttl = tonumber(ARGV[2])
local left = redis.call('TTL', KEYS[1])
if left > ttl then ttl = left end
if cur and tonumber(cur) <= tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ttl)
  return cur
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ttl)
return ARGV[1]
