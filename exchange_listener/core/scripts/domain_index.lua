-- Index one send under the domain of a ``to`` address (workers.state.sends).
-- KEYS: latest, first
-- ARGV: enrollment_id, sent_at, oldest, ttl
-- latest/first: zsets enrollment id -> epoch seconds of its latest/first send to the domain;
-- sent_at: epoch seconds of this send; oldest: epoch seconds of the oldest send kept.
-- Latest only moves later, first only earlier; an enrollment whose latest send fell out of the
-- retention leaves both sets together. Returns how many left.
redis.call('ZADD', KEYS[1], 'GT', ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[2], 'LT', ARGV[2], ARGV[1])
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, 1000)
for _, member in ipairs(old) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return #old
