-- Park an entry behind its enrollment's previous transition, if that one still blocks it
-- (workers.sinks.webhooks).
-- KEYS: outbox, state, predecessor_state
-- ARGV: transition_id, predecessor_id, due_ms, latest_ms, ttl, *channels
-- due_ms: when it is due if nothing blocks; latest_ms: the latest it may be parked until;
-- channels: the channels it waits for. Returns 1 if parked (due just after the predecessor, and
-- woken by it), 0 if rescheduled at due_ms.
local ps = redis.call('ZSCORE', KEYS[1], ARGV[2])
local blocked = false
if ps then
  for i = 6, #ARGV do
    if redis.call('HGET', KEYS[3], 'done:' .. ARGV[i]) ~= '1' then blocked = true end
  end
end
if not blocked then
  redis.call('HDEL', KEYS[2], 'behind', 'parked_at')
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[1], math.min(tonumber(ps) + 1, tonumber(ARGV[4])), ARGV[1])
redis.call('HSET', KEYS[2], 'behind', ARGV[2], 'parked_at', redis.call('ZSCORE', KEYS[1], ARGV[1]))
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('HSET', KEYS[3], 'waiter', ARGV[1])
redis.call('EXPIRE', KEYS[3], ARGV[5])
return 1
