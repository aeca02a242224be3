#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- After Milvus confirmed the writes: record each id's version in the index, release our
-- leases, and XACK the entries, atomically.
--
-- KEYS[1]  tasks stream
-- KEYS[2]  the index hash (id -> "<version> <content hash>"), same hash slot
-- KEYS[3]  the lease hash (id -> "<expires ms> <version> <consumer>"), same hash slot
-- KEYS[4]  the last-error hash of the stream, same hash slot
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name
-- ARGV[3]  n: how many ids follow as triples
-- ARGV[4 .. 3+3n]  triples: id, version written, content hash ("-" for a delete, "" when
--                  the write was refused: the lease is released, the index untouched)
-- ARGV[4+3n ..]    entry ids to ack (the written ones, the stale ones, superseded ones)
--
-- A newer version already in the index means our lease ran out while we wrote (a paused
-- or partitioned process), so our row may have landed over the newer one: the newer entry
-- is copied to the stream again (a fresh, even newer version), so the index ends with it
-- whatever order the two writes reached Milvus in. Returns a flat list of id, newer
-- version, new entry id ('' when the newer entry is no longer in the stream: trimmed).
local function older(a, b)  -- is version a < version b?
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local me, n = ARGV[2], tonumber(ARGV[3])
local conflicts = {}
for i = 4, 3 + 3 * n, 3 do
  local id, version, digest = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local held = redis.call('HGET', KEYS[2], id)
  local current = held and string.match(held, '^(%S+)')
  if digest == '' then
    -- refused: nothing was written, only the lease goes
  elseif not current or older(current, version) then
    redis.call('HSET', KEYS[2], id, version .. ' ' .. digest)
  elseif older(version, current) then
    local newer = redis.call('XRANGE', KEYS[1], current, current)
    local again = ''
    if #newer == 1 then
      again = redis.call('XADD', KEYS[1], '*', unpack(newer[1][2]))
    end
    conflicts[#conflicts + 1] = id
    conflicts[#conflicts + 1] = current
    conflicts[#conflicts + 1] = again
  end
  local lease = redis.call('HGET', KEYS[3], id)
  if lease and string.match(lease, '^%d+ %S+ (.*)$') == me then
    redis.call('HDEL', KEYS[3], id)
  end
end
if #ARGV >= 4 + 3 * n then
  local ids = {}
  for i = 4 + 3 * n, #ARGV do
    ids[#ids + 1] = ARGV[i]
  end
  redis.call('XACK', KEYS[1], ARGV[1], unpack(ids))
  redis.call('HDEL', KEYS[4], unpack(ids))
end
return conflicts
