-- Put failed ids back, all in one step and due in the order given (an enrollment's versions in
-- order), so no drainer sees a later version back before an earlier one. Only failed ids go back
-- (workers.sinks.webhooks).
-- KEYS: failed, outbox, *states
-- ARGV: now_ms, *ids
-- states: the outbox state hash of each id, in the same order. Returns how many went back.
local n = 0
for i = 2, #ARGV do
  if redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then
    redis.call('HDEL', KEYS[i + 1], 'attempts', 'last_error')
    redis.call('ZADD', KEYS[2], tonumber(ARGV[1]) - #ARGV + i, ARGV[i])
    n = n + 1
  end
end
return n
