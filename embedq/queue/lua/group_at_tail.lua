-- Create a consumer group at the stream's tail ($) that knows how many entries precede it.
--
-- KEYS[1]  tasks stream
-- ARGV[1]  group
--
-- Why: XGROUP CREATE ... $ alone leaves the group's entries-read unknown, and Redis reports
-- its lag as nil until the group catches up with the tail; KEDA then reads -1 and
-- `embedq enqueue --max-lag` falls back to the stream's length. ENTRIESREAD set to the
-- stream's entries-added makes the lag exact from the first entry after the start. Reading
-- entries-added and creating the group in one script means no XADD lands in between.
-- Errors as XGROUP CREATE does (BUSYGROUP when the group is there).
-- Returns the group's last-delivered-id: the stream's last id, '0-0' for a new stream.
local added = 0
local last = '0-0'
if redis.call('EXISTS', KEYS[1]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'entries-added' then
      added = info[i + 1]
    elseif info[i] == 'last-generated-id' then
      last = info[i + 1]
    end
  end
end
redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '$', 'MKSTREAM', 'ENTRIESREAD', added)
return last
