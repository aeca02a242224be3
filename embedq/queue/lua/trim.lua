#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- Trim the entries every consumer group is done with, and nothing else.
--
-- KEYS[1]  tasks stream
--
-- For each group the oldest entry it still needs is its first pending entry, or, with
-- nothing pending, the entry after its last-delivered-id. XTRIM MINID at the smallest of
-- those keeps every undelivered and every unacknowledged entry. A stream without groups
-- is left alone: all of it is undelivered. (MAXLEN would ignore groups before Redis 8.2.)
-- Reading the groups and trimming in one script means no group can move in between.
-- Returns {entries trimmed, the MINID used or ''}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {0, ''}
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
if #groups == 0 then
  return {0, ''}
end
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local keep_ms, keep_seq = nil, nil
for _, flat in ipairs(groups) do
  local g = {}
  for i = 1, #flat, 2 do
    g[flat[i]] = flat[i + 1]
  end
  local ms, seq
  if tonumber(g['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], g['name'])
    ms, seq = parse(summary[2])
  else
    ms, seq = parse(g['last-delivered-id'])
    seq = seq + 1
  end
  if keep_ms == nil or ms < keep_ms or (ms == keep_ms and seq < keep_seq) then
    keep_ms, keep_seq = ms, seq
  end
end
local minid = string.format('%d-%d', keep_ms, keep_seq)
local trimmed = redis.call('XTRIM', KEYS[1], 'MINID', minid)
return {trimmed, minid}
