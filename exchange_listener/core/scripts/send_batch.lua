-- Write validated, merged sends in one atomic step (workers.state.sends: record and record_many).
-- KEYS: *keys
-- ARGV: now, oldest, ttl, sends
-- keys: for each send in turn: its send keys (one per Message-ID), the latest/first pair of each
-- domain of its ``to`` addresses, then its enrollment's hash, events set and history list.
-- sends: a JSON array with an array per send: id count, domain count, body (the Send's JSON),
-- expiry (epoch ms), enrollment id, sent_at (epoch seconds), sequence id, mailbox, prospect (the
-- first ``to`` address; kept once set, as ``prospect`` of the enrollment); one argument
-- instead of eight a send (redis-py's packing of arguments was a third of a bulk import's time).
-- now: ISO 8601 time for a new enrollment's created_at/updated_at; oldest: epoch seconds of the
-- oldest send a domain index keeps; ttl: seconds, for the domain indexes and the enrollment.
-- Per send: every id's key holds the body until the expiry; in each domain index the latest
-- send only moves later and the first only earlier, and an enrollment whose latest send is past
-- the retention leaves both sets; the enrollment is created active if missing,
-- field for field as EnrollmentStore.ensure_commands (HSETNX each; one HSET when the hash is
-- missing), and its keys live another ttl.
-- Returns the number of sends written.
local now, oldest, ttl = ARGV[1], ARGV[2], ARGV[3]
local k, written = 1, 0
for _, send in ipairs(cjson.decode(ARGV[4])) do
  local ids, domains, body, expires_ms, enrollment, sent_at, sequence, mailbox, prospect = unpack(send)
  for _ = 1, ids do
    redis.call('SET', KEYS[k], body, 'PXAT', expires_ms)
    k = k + 1
  end
  for _ = 1, domains do
    local latest, first = KEYS[k], KEYS[k + 1]
    k = k + 2
    redis.call('ZADD', latest, 'GT', sent_at, enrollment)
    redis.call('ZADD', first, 'LT', sent_at, enrollment)
    local old = redis.call('ZRANGEBYSCORE', latest, '-inf', oldest, 'LIMIT', 0, 1000)
    for _, member in ipairs(old) do
      redis.call('ZREM', latest, member)
      redis.call('ZREM', first, member)
    end
    redis.call('EXPIRE', latest, ttl)
    redis.call('EXPIRE', first, ttl)
  end
  local hash = KEYS[k]
  local fields = {'status', 'active', 'reason', 'enrolled', 'created_at', now, 'updated_at', now, 'version', '0'}
  if sequence ~= '' then
    table.insert(fields, 'sequence_id')
    table.insert(fields, sequence)
  end
  if mailbox ~= '' then
    table.insert(fields, 'mailbox')
    table.insert(fields, mailbox)
  end
  if prospect ~= '' then
    table.insert(fields, 'prospect')
    table.insert(fields, prospect)
  end
  if redis.call('EXISTS', hash) == 0 then
    redis.call('HSET', hash, unpack(fields))
  else
    for i = 1, #fields, 2 do
      redis.call('HSETNX', hash, fields[i], fields[i + 1])
    end
  end
  for i = 0, 2 do
    redis.call('EXPIRE', KEYS[k + i], ttl)
  end
  k = k + 3
  written = written + 1
end
return written
