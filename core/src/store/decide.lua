-- couponrush: decide a batch of requests of ONE event, atomically.
--
-- KEYS[1]  cr:{E}:event    hash: stock, remaining, per_user_limit, generation, seq
-- KEYS[2]  cr:{E}:holders  hash: user_id -> coupons held
-- KEYS[3]  cr:{E}:coupons  hash: rank -> request_id .. user_id (request_id is 36 chars)
-- KEYS[4]  cr:{E}:free     list: ranks left free by a recovery (decisions lost with
--                          the store); used up first, so ranks stay unique
-- KEYS[4+i] cr:{E}:req:<request_id_i>  string: generation|code|rank|decided_at|seq|user_id,
--           (whether its outcome is in the log is kept apart, in cr:{E}:confirmed)
-- ARGV[1]  now, microseconds since the epoch
-- ARGV[2]  dedup record lifetime, seconds
-- ARGV[2+2i], ARGV[3+2i]  request_id_i, user_id_i, in arrival order
--
-- Returns {-1} when the event does not exist, else the event's generation
-- followed by five integers per request:
-- code (1 issued, 2 sold_out, 3 limit_reached, 4 duplicate), rank (0 unless
-- issued), decided_at, replay (1 when an earlier decision is restated), seq
-- (the event's decision sequence number: 1, 2, 3... in the order the store
-- decided; 0 for a duplicate, which decides nothing).
--
-- Every key shares the {E} hash tag, so the script runs on one Redis Cluster
-- slot. A request id seen before in this generation returns the same decision
-- (a Kafka redelivery is indistinguishable from the first delivery); the same
-- id sent by another user is a `duplicate` and changes nothing.

local meta = redis.call('HMGET', KEYS[1], 'stock', 'remaining', 'per_user_limit', 'generation', 'seq')
if not meta[1] then
  return {-1}
end
local stock = tonumber(meta[1])
local remaining = tonumber(meta[2])
local limit = tonumber(meta[3])
local generation = meta[4]
local seq = tonumber(meta[5] or '0')
local now = ARGV[1]
local ttl = ARGV[2]
local n = (#ARGV - 2) / 2
local has_free = redis.call('EXISTS', KEYS[4]) == 1
local out = {tonumber(generation)}
local fresh = false

for i = 1, n do
  local request_id = ARGV[1 + 2 * i]
  local user_id = ARGV[2 + 2 * i]
  local dedup_key = KEYS[4 + i]
  local code, rank, at, replay, dseq
  local prev = redis.call('GET', dedup_key)
  if prev then
    local g, c, r, a, q, u = string.match(prev, '^!?([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if g == generation then
      if u == user_id then
        code, rank, at, replay, dseq = tonumber(c), tonumber(r), tonumber(a), 1, tonumber(q)
      else
        code, rank, at, replay, dseq = 4, 0, tonumber(now), 0, 0
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
      rank = false
      if has_free then
        rank = redis.call('LPOP', KEYS[4])
        has_free = rank ~= false
      end
      rank = tonumber(rank) or (stock - remaining)
      redis.call('HINCRBY', KEYS[2], user_id, 1)
      redis.call('HSET', KEYS[3], rank, request_id .. user_id)
      code = 1
    end
    seq = seq + 1
    fresh = true
    at, replay, dseq = tonumber(now), 0, seq
    redis.call('SET', dedup_key, generation .. '|' .. code .. '|' .. rank .. '|' .. now .. '|' .. seq .. '|' .. user_id, 'EX', ttl)
  end
  out[#out + 1] = code
  out[#out + 1] = rank
  out[#out + 1] = at
  out[#out + 1] = replay
  out[#out + 1] = dseq
end

if fresh then
  redis.call('HSET', KEYS[1], 'remaining', remaining, 'seq', seq)
end
return out
