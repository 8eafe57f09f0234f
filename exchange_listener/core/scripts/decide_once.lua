-- One decision per mail: the first copy's counts (workers.jobs).
-- KEYS: decision
-- ARGV: candidate, ttl
-- candidate: this copy's decision (JSON). Returns the one that counts (stored earlier, or this one).
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ARGV[1]
