-- Apply one enrollment transition exactly once (workers.state.enrollments): the state hash, the
-- audit trail, the notifier's copy, the outbox entry and the stream entry, in one atomic step.
-- KEYS: enrollment, events, history, outbox, transition, stream
-- ARGV: draft, until_ms, now_ms, ttl, reopen, stream_maxlen
-- draft: the Transition as JSON (workers.state.transitions) with everything the caller knows;
-- this script fills in what only the enrollment's state knows (Transition.FROM_STATE:
-- previous_status, version, mailbox, sequence_id) and stores it as given otherwise.
-- until_ms: end of a pause (epoch ms; "0" unless the target is paused); now_ms: epoch ms of
-- draft.at; ttl: seconds every key lives after this write; reopen: "1" lets "active" leave
-- "stopped"; stream_maxlen: the stream's approximate cap.
-- Returns the stored transition (JSON), or false when nothing changed.
local t = cjson.decode(ARGV[1])
local until_ms, now, ttl, reopen, stream_maxlen = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6]
local function str(v) if v == nil or v == cjson.null then return '' end return v end
local function opt(v) if v == nil or v == '' or v == false then return cjson.null end return v end
local event_key, target = t.event_key, t.status

if redis.call('SISMEMBER', KEYS[2], event_key) == 1 then return false end
redis.call('SADD', KEYS[2], event_key)
redis.call('EXPIRE', KEYS[2], ttl)
local cur = redis.call('HMGET', KEYS[1], 'status', 'paused_until_ms', 'sequence_id')
local status = cur[1] or 'active'
if status == 'paused' and (tonumber(cur[2]) or 0) <= now then status = 'active' end
if status == 'stopped' and not (target == 'active' and reopen == '1') then return false end
if target == 'paused' and status == 'paused' and tonumber(until_ms) <= tonumber(cur[2]) then return false end
if target == 'active' and status == 'active' then return false end

local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('HSETNX', KEYS[1], 'created_at', t.at)
redis.call('HSET', KEYS[1], 'status', target, 'reason', str(t.reason), 'updated_at', t.at,
  'updated_at_ms', ARGV[3], 'by', str(t.by), 'item_id', str(t.item_id), 'message_id', str(t.message_id),
  'event_key', event_key)
if str(t.mailbox) ~= '' then redis.call('HSET', KEYS[1], 'mailbox', t.mailbox) end
if target == 'paused' then
  redis.call('HSET', KEYS[1], 'paused_until', t.paused_until, 'paused_until_ms', until_ms)
else
  redis.call('HDEL', KEYS[1], 'paused_until', 'paused_until_ms')
end
if target == 'stopped' then redis.call('HSET', KEYS[1], 'stopped_by', str(t.by))
else redis.call('HDEL', KEYS[1], 'stopped_by') end

t.previous_status = status
t.version = version
t.mailbox = opt(redis.call('HGET', KEYS[1], 'mailbox'))
t.sequence_id = opt(cur[3])
local payload = cjson.encode(t)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('RPUSH', KEYS[3], payload)
redis.call('EXPIRE', KEYS[3], ttl)
redis.call('SET', KEYS[5], payload, 'EX', ttl)
redis.call('ZADD', KEYS[4], now, t.id)
redis.call('XADD', KEYS[6], 'MAXLEN', '~', stream_maxlen, '*', 'data', payload)
return payload
