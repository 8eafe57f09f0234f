-- Give a mailbox's lease back only if it is still ours (exchange_listener.listener.leases).
-- KEYS: lease
-- ARGV: holder
-- Returns 1 when it was released, 0 when it was not ours (any more).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
