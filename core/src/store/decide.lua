-- couponrush: decide a batch of requests of ONE event, atomically.
--
-- KEYS[1]  cr:{E}:event    hash: stock, remaining, per_user_limit, generation
-- KEYS[2]  cr:{E}:holders  hash: user_id -> coupons held
-- KEYS[3]  cr:{E}:coupons  hash: rank -> request_id .. user_id (request_id is 36 chars)
-- KEYS[3+i] cr:{E}:req:<request_id_i>  string: generation|code|rank|decided_at|user_id
-- ARGV[1]  now, microseconds since the epoch
-- ARGV[2]  dedup record lifetime, seconds
-- ARGV[2+2i], ARGV[3+2i]  request_id_i, user_id_i, in arrival order
--
-- Returns {-1} when the event does not exist, else four integers per request:
-- code (1 issued, 2 sold_out, 3 limit_reached, 4 duplicate), rank (0 unless
-- issued), decided_at, replay (1 when an earlier decision is restated).
--
-- Every key shares the {E} hash tag, so the script runs on one Redis Cluster
-- slot. A request id seen before in this generation returns the same decision
-- (a Kafka redelivery is indistinguishable from the first delivery); the same
-- id sent by another user is a `duplicate` and changes nothing.

local meta = redis.call('HMGET', KEYS[1], 'stock', 'remaining', 'per_user_limit', 'generation')
if not meta[1] then
  return {-1}
end
local stock = tonumber(meta[1])
local remaining = tonumber(meta[2])
local limit = tonumber(meta[3])
local generation = meta[4]
local now = ARGV[1]
local ttl = ARGV[2]
local n = (#ARGV - 2) / 2
local out = {}
local changed = false

for i = 1, n do
  local request_id = ARGV[1 + 2 * i]
  local user_id = ARGV[2 + 2 * i]
  local dedup_key = KEYS[3 + i]
  local code, rank, at, replay
  local prev = redis.call('GET', dedup_key)
  if prev then
    local g, c, r, a, u = string.match(prev, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if g == generation then
      if u == user_id then
        code, rank, at, replay = tonumber(c), tonumber(r), tonumber(a), 1
      else
        code, rank, at, replay = 4, 0, tonumber(now), 0
      end
    end
  end
  if not code then
    local held = tonumber(redis.call('HGET', KEYS[2], user_id) or '0')
    if held >= limit then
      code, rank = 3, 0
    elseif remaining <= 0 then
      code, rank = 2, 0
    else
      remaining = remaining - 1
      rank = stock - remaining
      changed = true
      redis.call('HINCRBY', KEYS[2], user_id, 1)
      redis.call('HSET', KEYS[3], rank, request_id .. user_id)
      code = 1
    end
    at, replay = tonumber(now), 0
    redis.call('SET', dedup_key, generation .. '|' .. code .. '|' .. rank .. '|' .. now .. '|' .. user_id, 'EX', ttl)
  end
  out[#out + 1] = code
  out[#out + 1] = rank
  out[#out + 1] = at
  out[#out + 1] = replay
end

if changed then
  redis.call('HSET', KEYS[1], 'remaining', remaining)
end
return out
