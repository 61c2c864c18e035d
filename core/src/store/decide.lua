-- couponrush: apply a batch's hold actions, then decide its requests, of ONE
-- event, atomically.
--
-- KEYS[1]  cr:{E}:event    hash: stock, remaining, per_user_limit, generation, seq,
--                          claim_window (µs, 0 = no holds), released, claimed,
--                          dedup_since (µs by Redis's clock: when KEYS[8] was started),
--                          layout (2: no dedup record of the event is a string key),
--                          buckets K and bucket b (absent: 1 and 0; an event split
--                          over K buckets keeps bucket b under its own hash tag)
-- KEYS[2]  cr:{E}:holders  hash: user_id -> coupons held now
-- KEYS[3]  cr:{E}:coupons  hash: rank -> request_id .. user_id (request_id is 36 chars),
--                          the coupons out now
-- KEYS[4]  cr:{E}:free_ranks  zset: ranks below the highest issued that no coupon out
--                          holds (returned by a hold's end, or left free by a recovery);
--                          the lowest is given out first, so ranks stay unique
-- KEYS[5]  cr:{E}:holds    hash: request_id -> state|rank|until|ended_at|end_seq|user_id
--                          (state 1 held, 2 claimed, 3 released, 4 expired)
-- KEYS[6]  cr:{E}:due      zset: request ids still held, scored by their deadline
-- KEYS[7]  cr:{E}:free     list: free ranks as an earlier version kept them (written by its
--                          recoveries); moved into KEYS[4] on first sight, then deleted
-- KEYS[8]  cr:{E}:dedup    hash: request_id -> generation|code|rank|decided_at|seq|user_id,
--                          the dedup records written since dedup_since (whether an outcome
--                          is in the log is kept apart, in cr:{E}:confirmed)
-- KEYS[9]  cr:{E}:dedup:old  hash: the records of the window before
-- KEYS[9+i] cr:{E}:req:<request_id_i>  string: request i's record as an earlier version
--           kept it; passed (ARGV[4] = 1) while the event may hold such records (no
--           layout 2), read and never written
-- ARGV[1]  now, microseconds since the epoch
-- ARGV[2]  dedup retention R, seconds
-- ARGV[3]  m, the number of actions
-- ARGV[4]  1 when KEYS[9+i] are passed, else 0
-- ARGV[5]  the bucket count K the caller routed the requests by (by user)
-- ARGV[6+4j..9+4j]  request_id, user_id, verb (1 claim, 2 cancel, 3 expire), at; j = 0..m-1
-- then ARGV[.. 2i], ARGV[.. 2i+1]  request_id_i, user_id_i, in arrival order
--
-- Returns {-1} when the event does not exist; {-2} when it may keep records as
-- string keys and they were not passed (nothing was done: call again with them);
-- {-3, K} when the event has K buckets, not ARGV[5] (it was redefined: nothing
-- was done, route again);
-- else {generation, claim_window, m, layout, five integers per action, five per request}.
-- Per action: state (0: decided nothing; 2 claimed, 3 released, 4 expired), rank,
-- decided_at, replay (1 when an earlier end is restated), seq.
-- Per request: code (1 issued, 2 sold_out, 3 limit_reached, 4 duplicate), rank (0 unless
-- issued), decided_at, replay (1 when an earlier decision is restated), seq
-- (the event's decision sequence number: 1, 2, 3... in the order the store
-- decided, hold ends included; 0 for a duplicate, which decides nothing).
-- Bucket b of K hands out rank and sequence number (n-1)*K+b+1 for its own
-- n-th: disjoint across buckets, the same numbers as before when K = 1.
--
-- Every key shares the {E} hash tag, so the script runs on one Redis Cluster
-- slot. A request id seen before in this generation returns the same decision
-- (a Kafka redelivery is indistinguishable from the first delivery); the same
-- id sent by another user is a `duplicate` and changes nothing. Numbers that
-- are written back are formatted with %.0f: Lua's default would write large
-- ones as 1.7e+15.
--
-- Retention of the dedup records, by Redis's own clock (TIME), as SET EX kept
-- them: the records go to KEYS[8]; once it is R old, it becomes KEYS[9] and the
-- KEYS[9] before, whose records are all at least R old, is dropped; each hash
-- expires R after its last write. A record lives at least R and at most about
-- 2R. The cost is per call, not per request: one HMGET per hash to look the
-- batch up, one HSET to write it, and one write each of holders and coupons.

local meta = redis.call('HMGET', KEYS[1], 'stock', 'remaining', 'per_user_limit', 'generation', 'seq', 'claim_window', 'released', 'claimed', 'dedup_since', 'layout', 'buckets', 'bucket')
if not meta[1] then
  return {-1}
end
local buckets = tonumber(meta[11] or '1')
local bucket = tonumber(meta[12] or '0')
if buckets ~= tonumber(ARGV[5]) then
  return {-3, buckets}
end
local layout = tonumber(meta[10] or '1')
if layout < 2 and ARGV[4] ~= '1' then
  return {-2}
end
local legacy = layout < 2
local stock = tonumber(meta[1])
local remaining = tonumber(meta[2])
local limit = tonumber(meta[3])
local generation = meta[4]
local seq = tonumber(meta[5] or '0')
local window = tonumber(meta[6] or '0')
local released = tonumber(meta[7] or '0')
local claimed = tonumber(meta[8] or '0')
local now = ARGV[1]
local now_n = tonumber(now)
local ttl = ARGV[2]
local m = tonumber(ARGV[3])
local first_request = 6 + 4 * m
local n = (#ARGV - first_request + 1) / 2
local out = {tonumber(generation), window, m, layout}
local k = 4
local fresh = false

local function num(x)
  return string.format('%.0f', x)
end

-- The event-wide number of this bucket's n-th rank or decision.
local function wide(n)
  if buckets == 1 then
    return n
  end
  return num((n - 1) * buckets + bucket + 1)
end

-- The dedup window: started when unset, turned over once R old.
local clock = redis.call('TIME')
clock = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local since = tonumber(meta[9] or '')
local since_changed = false
if not since or clock - since >= tonumber(ttl) * 1000000 then
  if since then
    redis.call('UNLINK', KEYS[9])
    if redis.call('EXISTS', KEYS[8]) == 1 then
      redis.call('RENAME', KEYS[8], KEYS[9])
    end
  end
  since = clock
  since_changed = true
end

for j = 0, m - 1 do
  local request_id = ARGV[6 + 4 * j]
  local user_id = ARGV[7 + 4 * j]
  local verb = tonumber(ARGV[8 + 4 * j])
  local at = tonumber(ARGV[9 + 4 * j])
  local st, rank, dat, replay, dseq = 0, 0, 0, 0, 0
  local h = redis.call('HGET', KEYS[5], request_id)
  if h then
    local s, r, u, ea, es, holder = string.match(h, '^(%d+)|(%d+)|(%d+)|(%d+)|(%d+)|(.*)$')
    s = tonumber(s)
    local until_n = tonumber(u)
    local target = 2
    if verb == 2 then target = 3 elseif verb == 3 then target = 4 end
    if holder == user_id then
      if s == 1 then
        local ok = (verb == 1 and at < until_n) or verb == 2 or (verb == 3 and now_n >= until_n)
        if ok then
          seq = seq + 1
          fresh = true
          if target == 2 then
            claimed = claimed + 1
          else
            remaining = remaining + 1
            released = released + 1
            if redis.call('HINCRBY', KEYS[2], holder, -1) <= 0 then
              redis.call('HDEL', KEYS[2], holder)
            end
            redis.call('HDEL', KEYS[3], r)
            redis.call('ZADD', KEYS[4], r, r)
          end
          redis.call('ZREM', KEYS[6], request_id)
          redis.call('HSET', KEYS[5], request_id, target .. '|' .. r .. '|' .. u .. '|' .. now .. '|' .. wide(seq) .. '|' .. holder)
          st, rank, dat, replay, dseq = target, tonumber(r), now_n, 0, tonumber(wide(seq))
        end
      elseif s == target then
        st, rank, dat, replay, dseq = s, tonumber(r), tonumber(ea), 1, tonumber(es)
      end
    end
  end
  out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = st, rank, dat, replay, dseq
  k = k + 5
end

if redis.call('EXISTS', KEYS[7]) == 1 then
  for _, r in ipairs(redis.call('LRANGE', KEYS[7], 0, -1)) do
    redis.call('ZADD', KEYS[4], r, r)
  end
  redis.call('DEL', KEYS[7])
end
local has_free = redis.call('ZCARD', KEYS[4]) > 0

-- The whole call's lookups, one command per hash (after the actions, which
-- change what users hold).
local ids, users = {}, {}
for i = 1, n do
  ids[i] = ARGV[first_request + 2 * (i - 1)]
  users[i] = ARGV[first_request + 2 * (i - 1) + 1]
end
local records, older, counts = {}, false, {}
if n > 0 then
  records = redis.call('HMGET', KEYS[8], unpack(ids))
  if redis.call('EXISTS', KEYS[9]) == 1 then
    older = redis.call('HMGET', KEYS[9], unpack(ids))
  end
  counts = redis.call('HMGET', KEYS[2], unpack(users))
end
-- What this call wrote: records by request id, coupons held by user.
local written, held_by = {}, {}
local dedup_args, holder_users, coupon_args, hold_args, due_args = {}, {}, {}, {}, {}
local nd = 0
-- A record, generation|code|rank|decided_at|seq|user_id, from parts that
-- are the same for the whole call (fewer numbers formatted per request).
local prefix = generation .. '|'
local decided_at = '|' .. now .. '|'
local coded = {[2] = prefix .. '2|0' .. decided_at, [3] = prefix .. '3|0' .. decided_at}

for i = 1, n do
  local request_id = ids[i]
  local user_id = users[i]
  local code, rank, at, replay, dseq
  local prev = written[request_id] or records[i] or (older and older[i])
  if not prev and legacy then
    prev = redis.call('GET', KEYS[9 + i])
  end
  if prev then
    local g, c, r, a, q, u = string.match(prev, '^!?([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
    if g == generation then
      if u == user_id then
        code, rank, at, replay, dseq = tonumber(c), tonumber(r), tonumber(a), 1, tonumber(q)
      else
        code, rank, at, replay, dseq = 4, 0, now_n, 0, 0
      end
    end
  end
  if not code then
    local held = held_by[user_id]
    if not held then
      held = tonumber(counts[i] or '0')
    end
    if held >= limit then
      code, rank = 3, 0
    elseif remaining <= 0 then
      code, rank = 2, 0
    else
      remaining = remaining - 1
      rank = false
      if has_free then
        local popped = redis.call('ZPOPMIN', KEYS[4])
        rank = popped[1] or false
        has_free = rank ~= false and redis.call('ZCARD', KEYS[4]) > 0
      end
      rank = tonumber(rank) or tonumber(wide(stock - remaining))
      if not held_by[user_id] then
        holder_users[#holder_users + 1] = user_id
      end
      held_by[user_id] = held + 1
      coupon_args[#coupon_args + 1] = rank
      coupon_args[#coupon_args + 1] = request_id .. user_id
      code = 1
    end
    seq = seq + 1
    fresh = true
    local wseq = wide(seq)
    at, replay, dseq = now_n, 0, tonumber(wseq)
    local record
    if code == 1 then
      record = prefix .. '1|' .. rank .. decided_at .. wseq .. '|' .. user_id
    else
      record = coded[code] .. wseq .. '|' .. user_id
    end
    written[request_id] = record
    dedup_args[nd + 1], dedup_args[nd + 2] = request_id, record
    nd = nd + 2
    if code == 1 and window > 0 then
      local until_s = num(now_n + window)
      hold_args[#hold_args + 1] = request_id
      hold_args[#hold_args + 1] = '1|' .. rank .. '|' .. until_s .. '|0|0|' .. user_id
      due_args[#due_args + 1] = until_s
      due_args[#due_args + 1] = request_id
    end
  end
  out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = code, rank, at, replay, dseq
  k = k + 5
end

if nd > 0 then
  redis.call('HSET', KEYS[8], unpack(dedup_args))
  redis.call('EXPIRE', KEYS[8], ttl)
end
if #holder_users > 0 then
  local args = {}
  for _, u in ipairs(holder_users) do
    args[#args + 1] = u
    args[#args + 1] = held_by[u]
  end
  redis.call('HSET', KEYS[2], unpack(args))
  redis.call('HSET', KEYS[3], unpack(coupon_args))
end
if #hold_args > 0 then
  redis.call('HSET', KEYS[5], unpack(hold_args))
  redis.call('ZADD', KEYS[6], unpack(due_args))
end

if fresh or since_changed then
  redis.call('HSET', KEYS[1], 'remaining', remaining, 'seq', seq, 'released', released, 'claimed', claimed, 'dedup_since', num(since))
end
return out
