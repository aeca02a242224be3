#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- Remove consumers that have been idle a long time and hold nothing pending.
--
-- KEYS[1]  tasks stream
-- ARGV[1]  consumer group
-- ARGV[2]  minimum idle time in milliseconds
-- ARGV[3]  the calling consumer (never removed)
--
-- XGROUP DELCONSUMER drops a consumer's pending entries with it, making them unclaimable,
-- so a consumer is removed only when it has none. Checking and deleting in one script
-- means no XREADGROUP can hand the consumer an entry in between.
-- Returns the names of the removed consumers.
local removed = {}
local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
local min_idle = tonumber(ARGV[2])
for _, row in ipairs(consumers) do
  local info = {}
  for j = 1, #row, 2 do
    info[row[j]] = row[j + 1]
  end
  if info['pending'] == 0 and info['idle'] >= min_idle and info['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info['name'])
    removed[#removed + 1] = info['name']
  end
end
return removed
