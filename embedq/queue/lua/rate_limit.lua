#!lua
-- (A shebang script: a full Redis refuses it whole; the gateway then answers 503.)
-- Take one token from an API key's bucket (a token bucket shared by every gateway
-- replica: the state lives here, the time is Redis's own, so gateways' clocks and their
-- number do not matter).
--
-- KEYS[1]  the key's bucket, a hash {tokens, at_us}
-- ARGV[1]  refill rate, tokens per second (> 0)
-- ARGV[2]  capacity (burst), tokens (>= 1)
-- ARGV[3]  tokens this request costs
-- Returns {allowed (1/0), tokens left (string), milliseconds until `cost` tokens are there}.
local rate, capacity, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = redis.call('TIME')
local now_us = tonumber(now[1]) * 1000000 + tonumber(now[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at_us')
local tokens, at = tonumber(state[1]), tonumber(state[2])
if tokens == nil or at == nil then
  tokens, at = capacity, now_us
end
tokens = math.min(capacity, tokens + math.max(0, now_us - at) * rate / 1000000)
local allowed, wait_ms = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at_us', tostring(now_us))
-- A full bucket is the same as no bucket: let idle keys' state go.
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity * 1000 / rate) + 1000)
return {allowed, tostring(tokens), wait_ms}
