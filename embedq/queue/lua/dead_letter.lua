#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- Move one entry to the dead-letter stream and ack it on the tasks stream, atomically.
--
-- KEYS[1]  tasks stream
-- KEYS[2]  dead-letter stream (same hash slot as KEYS[1] on a cluster)
-- KEYS[3]  last-error hash of the tasks stream (same hash slot)
-- ARGV[1]  consumer group
-- ARGV[2]  entry id on the tasks stream
-- ARGV[3..] field, value pairs of the dead-letter entry (original fields + _dlq_* fields)
--
-- Returns 1 when the entry was pending and is now dead-lettered; 0 when it was no longer
-- pending (another worker acked it after a reclaim), in which case nothing is written, so
-- one entry never lands twice in the dead-letter stream. Either way the entry's recorded
-- last error is dropped: the entry is settled.
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[2])
if acked == 0 then
  return 0
end
local fields = {}
for i = 3, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
return 1
