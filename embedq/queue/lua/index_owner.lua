-- Tie a collection's index to one incarnation of that collection (a worker's start,
-- `Versions.own`): an index left by a dropped collection of the same name is emptied once,
-- before any write to the new one, and never again after a write was recorded in it.
--
-- KEYS[1]  the index hash (id -> "<version> <content hash>[ <vector digest>]")
-- KEYS[2]  the leases hash of the same collection
-- KEYS[3]  the incarnation the index describes (a string; absent before the first worker)
-- ARGV[1]  the collection's incarnation (its property `embedq.incarnation`)
-- ARGV[2]  "1" when the caller created the collection just now, else "0"
--
-- Returns 1 when it emptied an index or leases that held something, else 0. The
-- comparison and the DEL are one step: two workers that start together on a new collection
-- empty the index at most once, before either writes (a plain DEL by the creator, run after
-- the other worker had opened the collection and recorded writes, erased them: issue 26's
-- "unknown" rows).
local held = redis.call('GET', KEYS[3])
if held == ARGV[1] then
  return 0
end
local cleared = 0
-- Another incarnation's index, or none recorded on a collection made just now: stale.
-- None recorded on an existing collection: an index from before incarnations, kept.
if held or ARGV[2] == '1' then
  cleared = redis.call('DEL', KEYS[1], KEYS[2])
end
redis.call('SET', KEYS[3], ARGV[1])
if cleared > 0 then
  return 1
end
return 0
