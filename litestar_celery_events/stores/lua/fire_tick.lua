-- KEYS: ticks hash, queue list. ARGV: schedule name, slot, envelope. Claim the tick and enqueue at once.
local last = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '-1')
if tonumber(ARGV[2]) <= last then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('LPUSH', KEYS[2], ARGV[3])
return 1
