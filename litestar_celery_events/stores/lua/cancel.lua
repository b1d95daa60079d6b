-- KEYS: due zset, messages hash, tombstone. ARGV: emission id, tombstone ttl.
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return 1
end
return 0
