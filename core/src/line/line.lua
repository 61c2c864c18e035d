-- The Redis waiting room: every transition of a ticket is one of these
-- scripts, so each is atomic. Keys of one room share the hash tag {E}.
-- Ticket states move forward only: waiting -> admitted -> done |
-- admission_expired | left, or waiting -> lapsed | left.
-- Every answer is a list of strings (Lua nils would cut a list short).
-- Grace after a gap: a round that follows a pause longer than the ticket
-- ttl (Redis or every admitter was away, and the polls failed too) stamps
-- the room's resumed_at; a ticket lapses only when
-- now - max(seen, resumed_at) > ttl.

--! join
-- KEYS: room, wait, ticket.  ARGV: ticket_id, user_id, now, max_waiting, keep_secs
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_room'} end
local t = redis.call('HMGET', KEYS[3], 'user', 'pos', 'joined_at')
if t[1] then
  -- Ticket ids are derived from the user: another user's is not shown.
  if t[1] ~= ARGV[2] then return {'not_yours'} end
  local rank = redis.call('ZRANK', KEYS[2], ARGV[1])
  return {'exists', t[2], tostring(rank or 0), t[3]}
end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then return {'full'} end
local pos = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HSET', KEYS[3], 'user', ARGV[2], 'pos', pos, 'joined_at', ARGV[3],
  'seen', ARGV[3], 'state', 'waiting')
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[5]))
redis.call('ZADD', KEYS[2], pos, ARGV[1])
redis.call('HINCRBY', KEYS[1], 'joined', 1)
return {'created', tostring(pos), tostring(redis.call('ZRANK', KEYS[2], ARGV[1])), ARGV[3]}

--! poll
-- KEYS: room, wait, active, ticket.  ARGV: ticket_id, user_id, now, touch (1|0), leave (1|0)
local t = redis.call('HMGET', KEYS[4], 'user', 'pos', 'seen', 'state', 'admitted_at', 'deadline')
if not t[1] or t[1] ~= ARGV[2] then return {'none'} end
local now = tonumber(ARGV[3])
local cfg = redis.call('HMGET', KEYS[1], 'ttl_us', 'resumed_at')
local seen = math.max(tonumber(t[3]), tonumber(cfg[2] or '0') or 0)
local state = t[4]
if state == 'admitted' and tonumber(t[6]) <= now then
  if redis.call('ZREM', KEYS[3], ARGV[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'admission_expired', 1)
  end
  state = 'admission_expired'
  redis.call('HSET', KEYS[4], 'state', state)
end
if state == 'waiting' and now - seen > tonumber(cfg[1]) then
  -- Polled too late: it lapsed, whether or not the admitter reached it.
  state = 'lapsed'
  redis.call('HSET', KEYS[4], 'state', state)
  if redis.call('ZREM', KEYS[2], ARGV[1]) == 1 then
    redis.call('HINCRBY', KEYS[1], 'lapsed', 1)
  end
end
if ARGV[5] == '1' and (state == 'waiting' or state == 'admitted') then
  if state == 'waiting' then
    redis.call('ZREM', KEYS[2], ARGV[1])
  else
    redis.call('ZREM', KEYS[3], ARGV[1])
  end
  state = 'left'
  redis.call('HSET', KEYS[4], 'state', state)
  redis.call('HINCRBY', KEYS[1], 'left', 1)
end
local rank = 0
if state == 'waiting' then
  if ARGV[4] == '1' and now > tonumber(t[3]) then redis.call('HSET', KEYS[4], 'seen', ARGV[3]) end
  rank = redis.call('ZRANK', KEYS[2], ARGV[1]) or 0
end
return {state, t[2], tostring(rank), t[5] or '', t[6] or ''}

--! finish
-- KEYS: room, active, ticket.  ARGV: ticket_id, user_id
local t = redis.call('HMGET', KEYS[3], 'user', 'state')
if not t[1] or t[1] ~= ARGV[2] or t[2] ~= 'admitted' then return 0 end
redis.call('HSET', KEYS[3], 'state', 'done')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'done', 1)
return 1

--! admit
-- KEYS: room, wait, active.  ARGV: now, max, ticket key prefix, scan limit,
-- rate per second ('' for none), burst
-- The rate bucket (bucket, bucket_at) is the room's, shared by every
-- admitter: it fills at the rate and saves up at most the burst.
if redis.call('EXISTS', KEYS[1]) == 0 then return {'no_room'} end
local now = tonumber(ARGV[1])
local cfg = redis.call('HMGET', KEYS[1], 'max_active', 'ttl_us', 'window_us', 'round_at',
  'resumed_at')
local resumed = tonumber(cfg[5] or '0') or 0
if cfg[4] and now - tonumber(cfg[4]) > tonumber(cfg[2]) then
  resumed = now
  redis.call('HSET', KEYS[1], 'resumed_at', ARGV[1])
end
if not cfg[4] or now > tonumber(cfg[4]) then redis.call('HSET', KEYS[1], 'round_at', ARGV[1]) end
local expired = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('ZREM', KEYS[3], id)
  local k = ARGV[3] .. id
  if redis.call('HGET', k, 'state') == 'admitted' then
    redis.call('HSET', k, 'state', 'admission_expired')
    expired = expired + 1
  end
end
if expired > 0 then redis.call('HINCRBY', KEYS[1], 'admission_expired', expired) end
local want = tonumber(ARGV[2])
if cfg[1] and cfg[1] ~= '' then
  local free = tonumber(cfg[1]) - redis.call('ZCARD', KEYS[3])
  if free < want then want = free end
end
local rate, bucket = tonumber(ARGV[5]), 0
if rate then
  local burst = tonumber(ARGV[6])
  local b = redis.call('HMGET', KEYS[1], 'bucket', 'bucket_at')
  if b[2] then
    local at = tonumber(b[2])
    bucket = tonumber(b[1])
    if now > at then bucket = bucket + rate * (now - at) / 1000000 end
    if bucket > burst then bucket = burst end
    if now > at then redis.call('HSET', KEYS[1], 'bucket_at', ARGV[1]) end
  else
    bucket = burst
    redis.call('HSET', KEYS[1], 'bucket_at', ARGV[1])
  end
  if math.floor(bucket) < want then want = math.floor(bucket) end
end
local ttl, window = tonumber(cfg[2]), tonumber(cfg[3])
local out = {}
local n, lapsed, gone, scanned = 0, 0, 0, 0
while n < want and scanned < tonumber(ARGV[4]) do
  local head = redis.call('ZPOPMIN', KEYS[2])
  if #head == 0 then break end
  scanned = scanned + 1
  local id = head[1]
  local k = ARGV[3] .. id
  local t = redis.call('HMGET', k, 'state', 'seen', 'pos')
  if t[1] ~= 'waiting' then
    gone = gone + 1
  elseif now - math.max(tonumber(t[2]), resumed) > ttl then
    redis.call('HSET', k, 'state', 'lapsed')
    lapsed = lapsed + 1
  else
    redis.call('HSET', k, 'state', 'admitted', 'admitted_at', ARGV[1], 'deadline', now + window)
    redis.call('ZADD', KEYS[3], now + window, id)
    n = n + 1
    out[#out + 1] = id
    out[#out + 1] = t[3]
  end
end
if rate then redis.call('HSET', KEYS[1], 'bucket', tostring(bucket - n)) end
if n > 0 then redis.call('HINCRBY', KEYS[1], 'admitted', n) end
if lapsed > 0 then redis.call('HINCRBY', KEYS[1], 'lapsed', lapsed) end
local head = {'ok', tostring(expired), tostring(lapsed), tostring(gone),
  tostring(redis.call('ZCARD', KEYS[3]))}
for _, v in ipairs(out) do head[#head + 1] = v end
return head
