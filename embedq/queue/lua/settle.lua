#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- After Milvus confirmed the writes: record each id's version in the index, release our
-- leases, and XACK the entries, atomically.
--
-- KEYS[1]  tasks stream
-- KEYS[2]  the index hash (id -> "<version> <content hash> <vector digest>"; no digest
--          field when the writer gave none, e.g. a delete), same hash slot
-- KEYS[3]  the lease hash (id -> "<expires ms> <version> <consumer>"), same hash slot
-- KEYS[4]  the last-error hash of the stream, same hash slot
-- ARGV[1]  consumer group
-- ARGV[2]  consumer name
-- ARGV[3]  n: how many ids follow as quadruples
-- ARGV[4 .. 3+4n]  quadruples: id, version written, content hash ("-" for a delete, ""
--                  when the write was refused: the lease is released, the index
--                  untouched), vector digest (embedq/sink/digest.py; "" for none)
-- ARGV[4+4n ..]    entry ids to ack (the written ones, the stale ones, superseded ones)
--
-- A newer version already in the index means our lease ran out while we wrote (a paused
-- or partitioned process), so our row may have landed over the newer one: the newer entry
-- is copied to the stream again (a fresh, even newer version), so the index ends with it
-- whatever order the two writes reached Milvus in. Returns a flat list of id, newer
-- version, new entry id ('' when the newer entry is no longer in the stream: trimmed).
-- As in fence.lua: one HMGET per hash and one HSET / HDEL per slice of ids, not a call per
-- id; slices keep unpack() under Lua's C stack.
local SLICE = 2000
local function older(a, b)  -- is version a < version b?
  if a == b then
    return false
  end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local function in_slices(command, key, values, group)  -- SLICE is even: pairs stay whole
  for first = 1, #values, SLICE do
    local last = math.min(first + SLICE - 1, #values)
    if group then
      redis.call(command, key, group, unpack(values, first, last))
    else
      redis.call(command, key, unpack(values, first, last))
    end
  end
end
local me, n = ARGV[2], tonumber(ARGV[3])
local conflicts = {}
for first = 1, n, SLICE do
  local last = math.min(first + SLICE - 1, n)
  local ids = {}
  for k = first, last do
    ids[#ids + 1] = ARGV[4 * k]
  end
  local held = redis.call('HMGET', KEYS[2], unpack(ids))
  local leases = redis.call('HMGET', KEYS[3], unpack(ids))
  local index, released = {}, {}  -- id, index value, ... and ids: one call each
  local recorded, gone = {}, {}  -- this slice's own updates (an id that comes twice sees them)
  for j = 1, #ids do
    local base = 4 * (first + j - 1)
    local id, version, hash = ARGV[base], ARGV[base + 1], ARGV[base + 2]
    local vectors = ARGV[base + 3]  -- the vector digest
    local current = recorded[id]
    if current == nil then
      current = held[j] and string.match(held[j], '^(%S+)')
    end
    if hash == '' then
      -- refused: nothing was written, only the lease goes
    elseif not current or older(current, version) then
      index[#index + 1] = id
      if vectors == '' then
        index[#index + 1] = version .. ' ' .. hash
      else
        index[#index + 1] = version .. ' ' .. hash .. ' ' .. vectors
      end
      recorded[id] = version
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
    local lease = leases[j]
    if lease and not gone[id] and string.match(lease, '^%d+ %S+ (.*)$') == me then
      released[#released + 1] = id
      gone[id] = true
    end
  end
  in_slices('HSET', KEYS[2], index)
  in_slices('HDEL', KEYS[3], released)
end
if #ARGV >= 4 + 4 * n then
  local acked = {}
  for i = 4 + 4 * n, #ARGV do
    acked[#acked + 1] = ARGV[i]
  end
  in_slices('XACK', KEYS[1], acked, ARGV[1])
  in_slices('HDEL', KEYS[4], acked)
end
return conflicts
