-- KEYS: due zset, messages hash. ARGV: now, most to move. Returns {moved, next due score or nil}.
-- The queue list named inside each message is written too: fine on one Redis server (not Cluster).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local v = redis.call('HGET', KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
  if v then
    redis.call('HDEL', KEYS[2], id)
    local sep = string.find(v, '\n', 1, true)
    redis.call('LPUSH', string.sub(v, 1, sep - 1), string.sub(v, sep + 1))
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#ids, nxt[2]}
