-- Take or keep one of a mailbox's IMAP connection slots (exchange_listener.sources.imap.session).
-- KEYS: slots
-- ARGV: token, ttl_ms, limit
-- Returns 1 when the token holds a slot until now + ttl_ms, 0 when every slot is taken.
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 0
end
redis.call('ZADD', KEYS[1], now_ms + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
