#!lua
-- (A shebang script: Redis refuses it whole, before it runs, when it is out of memory, so
-- a full Redis never keeps half of it. Scripts without one run under OOM: the ack paths
-- rely on that to keep draining a full Redis.)
-- Send dead-lettered entries back to the tasks stream, atomically per call.
--
-- KEYS[1]  tasks stream
-- KEYS[2]  dead-letter stream (same hash slot as KEYS[1] on a cluster)
-- ARGV[1..] dead-letter entry ids
--
-- For each id still in the dead-letter stream, the original fields (every field except
-- the _dlq_* ones the dead-letter script added) are XADDed to the tasks stream as a new
-- entry, with a fresh delivery count, and the dead-letter entry is XDELed. Doing both in
-- one script means a crash never leaves an entry in both places or in neither.
-- An entry with no original fields (its payload was deleted before it was dead-lettered)
-- is left in place: sent back it could only be dead-lettered again; so is one whose
-- copy was cut (_dlq_truncated): it is no longer the original.
-- Returns a flat list: dead-letter id, new tasks-stream id ('' when skipped), ...
local out = {}
for i = 1, #ARGV do
  local found = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  local new_id = ''
  if #found == 1 then
    local fields = found[1][2]
    local original = {}
    local cut = false
    for j = 1, #fields, 2 do
      if fields[j] == '_dlq_truncated' then
        cut = true
      elseif string.sub(fields[j], 1, 5) ~= '_dlq_' then
        original[#original + 1] = fields[j]
        original[#original + 1] = fields[j + 1]
      end
    end
    if #original > 0 and not cut then
      new_id = redis.call('XADD', KEYS[1], '*', unpack(original))
      redis.call('XDEL', KEYS[2], ARGV[i])
    end
  end
  out[#out + 1] = ARGV[i]
  out[#out + 1] = new_id
end
return out
