-- KEYS: due zset, messages hash, tombstone. ARGV: emission id, due timestamp, "<list key>\n<envelope>".
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return 1
