-- Wake an entry parked behind a predecessor that just got through, unless it has moved since
-- (claimed by a drainer, rescheduled for a failure of its own, delivered) (workers.sinks.webhooks).
-- KEYS: outbox, waiter_state
-- ARGV: waiter_id, predecessor_id, now_ms
-- Returns 1 when woken, 0 when it had moved.
local st = redis.call('HMGET', KEYS[2], 'behind', 'parked_at')
if st[1] ~= ARGV[2] then return 0 end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) ~= st[2] then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HDEL', KEYS[2], 'behind', 'parked_at')
return 1
