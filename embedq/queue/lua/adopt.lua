-- Rebuild index entries from the rows the collection holds (`embedq verify --adopt`, after
-- Redis lost its data): each id gets its row's version, content hash and vector digest, unless the index
-- already holds that version or a newer one (a worker running meanwhile recorded it).
--
-- KEYS[1]  the index hash (id -> "<version> <content hash>[ <vector digest>]")
-- ARGV[1 ..]  quadruples: id, the row's version, its content hash, its vector digest ("": none)
--
-- Returns how many entries it wrote. One HMGET and one HSET per slice of ids, as in
-- fence.lua; slices keep unpack() under Lua's C stack.
local SLICE = 1000
local function older(a, b)  -- is version a < version b? (an unreadable a is older)
  if a == b then
    return false
  end
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if not ams then
    return true
  end
  if not bms then
    return false
  end
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
local n = math.floor(#ARGV / 4)
local written = 0
for first = 1, n, SLICE do
  local last = math.min(first + SLICE - 1, n)
  local ids = {}
  for k = first, last do
    ids[#ids + 1] = ARGV[4 * k - 3]
  end
  local held = redis.call('HMGET', KEYS[1], unpack(ids))
  local values = {}
  for j = 1, #ids do
    local k = first + j - 1
    local version, hash, digest = ARGV[4 * k - 2], ARGV[4 * k - 1], ARGV[4 * k]
    local current = held[j] and string.match(held[j], '^(%S+)')
    if not current or older(current, version) then
      values[#values + 1] = ids[j]
      values[#values + 1] = version .. ' ' .. hash .. (digest ~= '' and (' ' .. digest) or '')
      written = written + 1
    end
  end
  if #values > 0 then
    redis.call('HSET', KEYS[1], unpack(values))
  end
end
return written
