#!lua flags=allow-oom
-- (allow-oom: a Redis out of memory still runs this script, so workers keep draining a full
-- Redis; what it adds is small and bounded by the entries in hand. Producers' scripts
-- carry no such flag and are refused whole.)
-- Take the write lease of each id before its row is written, unless a newer (or the same)
-- version of it is already in the index, or another live writer holds it.
--
-- KEYS[1]  the index hash of the (partition) stream: id -> "<version> <content hash>
--          [<vector digest>]" (content hash "-" for a delete; only the version is read
--          here); written by settle.lua after Milvus confirmed
-- KEYS[2]  the lease hash (same hash slot): id -> "<expires ms> <version> <consumer>"
-- ARGV[1]  consumer name
-- ARGV[2]  lease length in ms (the reclaim idle threshold: a dead holder's lease ends when
--          its entries become reclaimable)
-- ARGV[3..] pairs: id, version (the stream entry id that says what the row must be)
--
-- Returns one status per id, in order: 'go' (the lease is ours: write, then settle),
-- 'stale' (the index already holds this version or a newer one: ack without writing),
-- 'busy' (another writer holds a live lease: wait for it to settle or expire, ask again).
-- Versions are compared as stream entry ids (ms, then sequence); Redis's own clock decides
-- expiry, so workers' clocks never matter.
-- The hashes are read with one HMGET each and written with one HSET per slice of ids
-- (not a call per id): a Redis call from Lua costs more than the work it does here, and
-- this runs for every entry the fleet writes. Slices keep unpack() under Lua's C stack.
local SLICE = 2000
local function older_or_same(a, b)  -- is version a <= version b?
  if a == b then
    return true
  end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq <= bseq)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, lease_ms = ARGV[1], tonumber(ARGV[2])
local ids, versions = {}, {}
for i = 3, #ARGV, 2 do
  ids[#ids + 1] = ARGV[i]
  versions[#versions + 1] = ARGV[i + 1]
end
local out = {}
for first = 1, #ids, SLICE do
  local last = math.min(first + SLICE - 1, #ids)
  local held = redis.call('HMGET', KEYS[1], unpack(ids, first, last))
  local leases = redis.call('HMGET', KEYS[2], unpack(ids, first, last))
  local taken = {}  -- id, lease, ...: one HSET for the slice
  local mine = {}  -- ids leased earlier in this slice (an id twice: its lease is ours)
  for j = 1, last - first + 1 do
    local id, version = ids[first + j - 1], versions[first + j - 1]
    local status = 'go'
    if held[j] and older_or_same(version, string.match(held[j], '^(%S+)')) then
      status = 'stale'
    else
      local lease = leases[j]
      if lease and not mine[id] then
        local expires, _, holder = string.match(lease, '^(%d+) (%S+) (.*)$')
        if holder ~= me and tonumber(expires) > now then
          status = 'busy'
        end
      end
      if status == 'go' then
        mine[id] = true
        taken[#taken + 1] = id
        taken[#taken + 1] = (now + lease_ms) .. ' ' .. version .. ' ' .. me
      end
    end
    out[#out + 1] = status
  end
  if #taken > 0 then
    redis.call('HSET', KEYS[2], unpack(taken))
  end
end
return out
