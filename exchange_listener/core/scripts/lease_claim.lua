-- Take or keep a mailbox's lease when it is free or already ours (exchange_listener.listener.leases).
-- KEYS: lease
-- ARGV: holder, ttl_ms
-- Returns 1 when the lease is now the holder's, 0 when another listener holds it.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
