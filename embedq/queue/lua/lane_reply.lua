#!lua flags=allow-oom
-- (allow-oom: like the other worker scripts, a full Redis still lets a worker answer and
-- ack what it holds; each answer is one vector and expires within seconds.)
-- Answer online requests and ack their lane entries, atomically: an entry is acked only
-- with its answer written, so a worker that dies in between leaves it pending (reclaimed,
-- or answered 503 by the gateway at the request's deadline).
--
-- KEYS[1]     the interactive lane stream
-- KEYS[2..n]  one reply list per answer (a request's inputs share it), same hash slot
-- ARGV[1]     consumer group
-- ARGV[2]     time to live of the reply lists (ms): a reply nobody waits for any more (the
--             gateway gave up at the deadline) expires instead of piling up
-- ARGV[3 .. n+1]  the answers, one per reply key, in KEYS order (embedq.queue.online_wire.pack_reply)
-- ARGV[n+2 ..]    lane entry ids to ack
-- Returns how many entries were acked.
local group, ttl = ARGV[1], tonumber(ARGV[2])
local answers = #KEYS - 1
for i = 1, answers do
  redis.call('RPUSH', KEYS[i + 1], ARGV[i + 2])
  redis.call('PEXPIRE', KEYS[i + 1], ttl)
end
local ids = {}
for i = answers + 3, #ARGV do
  ids[#ids + 1] = ARGV[i]
end
if #ids == 0 then
  return 0
end
return redis.call('XACK', KEYS[1], group, unpack(ids))
