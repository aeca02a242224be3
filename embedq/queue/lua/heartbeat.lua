#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- Keep ownership of entries a long batch is still working on.
--
-- KEYS[1]  tasks stream
-- ARGV[1]  consumer group
-- ARGV[2]  consumer (this worker)
-- ARGV[3..] entry ids in the batch
--
-- XCLAIM ... JUSTID resets an entry's idle time without raising its delivery count, but it
-- takes the entry from whoever owns it. So each id is first checked to be still pending for
-- this consumer: an entry another worker has reclaimed meanwhile is left with it.
-- Returns the ids still owned by this consumer (now with idle time 0).
local owned = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p == 1 then
    owned[#owned + 1] = ARGV[i]
  end
end
if #owned > 0 then
  local args = {KEYS[1], ARGV[1], ARGV[2], 0}
  for _, id in ipairs(owned) do
    args[#args + 1] = id
  end
  args[#args + 1] = 'JUSTID'
  redis.call('XCLAIM', unpack(args))
end
return owned
