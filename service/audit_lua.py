"""The audit trail's Lua: SHA-256, and the append that chains each entry to the one before.

The append must read the newest entry's hash and add the next entry in one step, or two
processes appending at once would both link to the same predecessor and fork the chain. Only a
Lua script does that in one step, and Redis' Lua has SHA-1 alone (``redis.sha1hex``): SHA-256
is written here, over LuaBitOp (the ``bit`` library Redis loads), and a test holds it to
``hashlib`` at every length around a block boundary. It hashes a link's few fixed fields (two
64-byte blocks, about 0.14 ms of Redis' time: see docs/benchmarks.md), never a whole entry:
the entry's own SHA-256 comes from the caller, and the verifier recomputes it from what is
stored.
"""

from __future__ import annotations

SHA256 = """
local K = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
}
local band, bor, bxor = bit.band, bit.bor, bit.bxor
local rshift, lshift, ror, tobit = bit.rshift, bit.lshift, bit.ror, bit.tobit

local function be32(n)
  return string.char(band(rshift(n, 24), 255), band(rshift(n, 16), 255), band(rshift(n, 8), 255), band(n, 255))
end

local function sha256(msg)
  local len = #msg
  msg = msg .. '\\128' .. string.rep('\\0', (55 - len) % 64) .. be32(0) .. be32(len * 8)
  local H = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19}
  local w = {}
  for block = 1, #msg, 64 do
    for j = 0, 15 do
      local b1, b2, b3, b4 = string.byte(msg, block + j * 4, block + j * 4 + 3)
      w[j] = bor(lshift(b1, 24), lshift(b2, 16), lshift(b3, 8), b4)
    end
    for j = 16, 63 do
      local v, u = w[j - 15], w[j - 2]
      local s0 = bxor(ror(v, 7), ror(v, 18), rshift(v, 3))
      local s1 = bxor(ror(u, 17), ror(u, 19), rshift(u, 10))
      w[j] = tobit(w[j - 16] + s0 + w[j - 7] + s1)
    end
    local a, b, c, d, e, f, g, h = H[1], H[2], H[3], H[4], H[5], H[6], H[7], H[8]
    for j = 0, 63 do
      -- sums of a few 32-bit words stay exact in a Lua number; only what the next round's bit
      -- operations read is brought back to 32 bits
      local t1 = h + bxor(ror(e, 6), ror(e, 11), ror(e, 25)) + bxor(g, band(e, bxor(f, g))) + K[j + 1] + w[j]
      local t2 = bxor(ror(a, 2), ror(a, 13), ror(a, 22)) + bor(band(a, b), band(c, bor(a, b)))
      h, g, f, e, d, c, b, a = g, f, e, tobit(d + t1), c, b, a, tobit(t1 + t2)
    end
    H[1], H[2], H[3], H[4] = tobit(H[1] + a), tobit(H[2] + b), tobit(H[3] + c), tobit(H[4] + d)
    H[5], H[6], H[7], H[8] = tobit(H[5] + e), tobit(H[6] + f), tobit(H[7] + g), tobit(H[8] + h)
  end
  local out = {}
  for i = 1, 8 do out[i] = be32(H[i]) end
  return table.concat(out)
end
"""

# KEYS: the stream, its head (hash: h = the newest entry's hash, n = its number, id, trim_at),
# its anchor (hash: the oldest kept entry's id, n and p, written when retention trims).
# ARGV: retention in ms ('0': keep everything), ms between retention checks, then for each
# entry its body and the SHA-256 of that body (32 bytes).
# Each entry is stored as b (body), p (the previous entry's hash, 32 bytes; the first entry's
# is 32 zero bytes) and n (its number, from 1). Its own hash is SHA-256 of
# p || sha256(b) || "<id> <n>", which the next entry stores as its p (service/audit.py, link()).
# Returns id, n, p, hash (32 bytes each) for each entry.
APPEND = SHA256 + """
local GENESIS = string.rep('\\0', 32)
local head = redis.call('HMGET', KEYS[2], 'h', 'n', 'trim_at')
local prev, seq = head[1] or GENESIS, tonumber(head[2] or '0')
local out, id = {}, nil
for i = 3, #ARGV, 2 do
  seq = seq + 1
  id = redis.call('XADD', KEYS[1], '*', 'b', ARGV[i], 'p', prev, 'n', seq)
  local hash = sha256(prev .. ARGV[i + 1] .. id .. ' ' .. seq)
  out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4] = id, seq, prev, hash
  prev = hash
end
redis.call('HSET', KEYS[2], 'h', prev, 'n', seq, 'id', id)
local retention = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if retention > 0 and now - retention > 0 and now >= tonumber(head[3] or '0') then
  redis.call('HSET', KEYS[2], 'trim_at', now + tonumber(ARGV[2]))
  -- Only entries that retention removed move the anchor: entries deleted by hand before it
  -- are a gap that verify reports, not a new start.
  if redis.call('XTRIM', KEYS[1], 'MINID', '~', now - retention) > 0 then
    local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    local fields = {}
    for j = 1, #first[2], 2 do fields[first[2][j]] = first[2][j + 1] end
    redis.call('HSET', KEYS[3], 'id', first[1], 'n', fields['n'], 'p', fields['p'])
  end
end
return out
"""


def create_and_append(create: str) -> str:
    """A script that runs ``create`` (service/jobstore.py CREATE: it returns 1 when it stored
    the job) and, only when it did, APPEND: a job accepted and the entry that records it are
    written together or not at all, in one round trip.
    KEYS: create's, then APPEND's. ARGV: the number of create's keys, the number of its
    arguments, its arguments, then APPEND's. Returns APPEND's answer, or {create's answer} when
    nothing was created."""
    return SHA256 + (
        "local function append(KEYS, ARGV)\n" + APPEND[len(SHA256):] + "end\n"
        "local function create(KEYS, ARGV)\n" + create + "end\n"
        """
local nkeys, nargs = tonumber(ARGV[1]), tonumber(ARGV[2])
local ck, ca, ak, aa = {}, {}, {}, {}
for i = 1, #KEYS do if i <= nkeys then ck[#ck + 1] = KEYS[i] else ak[#ak + 1] = KEYS[i] end end
for i = 3, #ARGV do if i <= nargs + 2 then ca[#ca + 1] = ARGV[i] else aa[#aa + 1] = ARGV[i] end end
local answer = create(ck, ca)
if answer ~= 1 then return {answer} end
return append(ak, aa)
""")
