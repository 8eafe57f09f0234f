-- Claim due outbox entries by moving them a lease ahead (workers.sinks.webhooks), so concurrent
-- drainers never take the same entry.
-- KEYS: outbox
-- ARGV: now_ms, lease_ms, limit
-- Returns the claimed transition ids.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], until_ms, id) end
return ids
