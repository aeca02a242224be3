#!lua
-- (A shebang script: Redis refuses it whole, before it runs, when it is out of memory, so
-- a full Redis never keeps half of it. Scripts without one run under OOM: the ack paths
-- rely on that to keep draining a full Redis.)
-- Add a batch of entries to one tasks stream and record how far the job got, atomically.
--
-- KEYS[1]  tasks stream (one partition)
-- KEYS[2]  the job's resume position on that stream, a hash (same hash slot as KEYS[1])
-- ARGV[1]  job id, written into every entry's `job` field; '' for no job (then KEYS[2] is
--          not touched and may be KEYS[1])
-- ARGV[2]  source position of the batch's last entry
-- ARGV[3..] four values per entry: id, text, meta ('' = none), text_hash ('' = none; no
--          longer sent, kept for producers of an older version)
--
-- A producer killed before this script ran sent nothing of the batch; after it, all of
-- it, and the position says so. A restart that skips every source position up to the
-- stored one therefore sends each record exactly once in total.
-- A batch at or below the stored position was applied already: a client that retried the
-- call after losing its reply (redis-py's cluster client does so by itself) adds nothing
-- the second time. Without a job there is no position to check.
-- Returns the number of entries added.
local stream, job = KEYS[1], ARGV[1]
if job ~= '' then
  local stored = redis.call('HGET', KEYS[2], 'position')
  if stored and tonumber(stored) >= tonumber(ARGV[2]) then
    return 0
  end
end
local added = 0
for i = 3, #ARGV, 4 do
  local id, text, meta, hash = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if meta == '' and hash == '' and job ~= '' then
    -- the common case, spelled out: building a table per entry costs more than the XADD
    redis.call('XADD', stream, '*', 'id', id, 'text', text, 'job', job)
  else
    local fields = {'id', id, 'text', text}
    if meta ~= '' then
      fields[#fields + 1] = 'meta'
      fields[#fields + 1] = meta
    end
    if job ~= '' then
      fields[#fields + 1] = 'job'
      fields[#fields + 1] = job
    end
    if hash ~= '' then
      fields[#fields + 1] = 'text_hash'
      fields[#fields + 1] = hash
    end
    redis.call('XADD', stream, '*', unpack(fields))
  end
  added = added + 1
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[2], 'position', ARGV[2])
  redis.call('HINCRBY', KEYS[2], 'enqueued', added)
end
return added
