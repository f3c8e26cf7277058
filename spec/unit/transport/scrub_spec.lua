-- The key scrubber by property: for any key, any message that holds
-- slices of it (8 bytes or more, at any position, any number of them,
-- next to each other or in noise, the message cut anywhere or whole),
-- the scrubbed message holds no 8 consecutive bytes of the key. This is
-- the one place where a missed bug leaks a secret, so it is checked over
-- thousands of random cases (seeded: a failure names its seed).
local G = require "gen"
local errors = require "lbatch.impl.transport.errors"

local FRAGMENT = 8

-- the first piece of `key` of FRAGMENT bytes (or the whole key when it is
-- shorter) found in s, or nil
local function leak(s, key)
  local w = math.min(#key, FRAGMENT)
  for i = 1, #key - w + 1 do
    local piece = key:sub(i, i + w - 1)
    if s:find(piece, 1, true) then return piece end
  end
end

local KEY_ALPHABETS = {
  "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
  "0123456789abcdef",
  "ab",                                           -- repetitive keys: pieces overlap
  "a-_.:/+=",
}
local NOISE = "abcdefghijklmnopqrstuvwxyz0123456789 \"{}:,.-_=/\n"

local function a_key(g)
  local alphabet = g:pick(KEY_ALPHABETS)
  local n = g:pick({ 8, 9, 12, 16, 20, 32, 35, 51, 64, 100 })
  local key = g:bytes(n, alphabet)
  if g:chance(0.2) then key = "sk-" .. key end
  return key
end

-- a message: noise, whole keys and slices of it, in random chunks
local function a_message(g, key)
  local parts = {}
  for _ = 1, g:int(1, 6) do
    if g:chance(0.4) then parts[#parts + 1] = g:bytes(g:int(0, 20), NOISE) end
    local r = g:int(10)
    if r <= 2 then
      parts[#parts + 1] = key
    elseif r <= 8 then
      local len = g:int(math.min(FRAGMENT, #key), #key)
      local at = g:int(1, #key - len + 1)
      parts[#parts + 1] = key:sub(at, at + len - 1)
    else
      parts[#parts + 1] = g:bytes(g:int(1, 3), NOISE)
    end
  end
  local s = table.concat(parts)
  if g:chance(0.5) then                                  -- cut anywhere: a message truncated
    local a = g:int(1, #s)
    s = s:sub(a, g:int(a, #s))
  end
  return s
end

describe("the key scrubber", function()
  it("leaves no 8 consecutive bytes of any key in any message (property)", function()
    local g = G.new(2025)
    for case = 1, 4000 do
      local key = a_key(g)
      local scrub = errors.scrubber({ key })
      local s = a_message(g, key)
      local out = scrub(s)
      local piece = leak(out, key)
      assert(not piece, ("case %d (seed %d): key %q, message %q -> %q leaks %q"):format(case, g.seed, key, s,
        out, tostring(piece)))
    end
  end)

  it("scrubs every secret of a list, each wherever it is", function()
    local g = G.new(7)
    for case = 1, 500 do
      local keys = { a_key(g), a_key(g), a_key(g) }
      local scrub = errors.scrubber(keys)
      local s = a_message(g, keys[1]) .. g:bytes(g:int(0, 5), NOISE) .. a_message(g, keys[2])
        .. a_message(g, keys[3])
      local out = scrub(s)
      for _, key in ipairs(keys) do
        assert(not leak(out, key), ("case %d: %q leaks a piece of %q in %q"):format(case, s, key, out))
      end
    end
  end)

  it("keeps what holds no piece of the key, byte for byte", function()
    local g = G.new(11)
    for _ = 1, 500 do
      local key = g:bytes(32, "ABCDEFGHIJKLMNOP")
      local s = g:bytes(g:int(0, 80), "abcdefghijklmnopqrstuvwxyz0123456789 ")
      s = s .. key:sub(1, 7) .. " " .. key:sub(-7)          -- 7 bytes of it: too short to scrub
      assert.are.equal(s, errors.scrubber({ key })(s))
    end
  end)

  it("scrubs a short secret (4 to 7 bytes) only whole", function()
    local scrub = errors.scrubber({ "pa55", "s3cr3t7" })
    assert.are.equal("x *** y *** z", scrub("x pa55 y s3cr3t7 z"))
    assert.are.equal("pa5 s3cr3t", scrub("pa5 s3cr3t"))
    assert.are.equal("abc", errors.scrubber({ "abc" })("abc"))   -- under 4 bytes: not a secret
  end)

  it("scrubs every string field of an error, and only strings", function()
    local key = "sk-0123456789abcdefghij"
    local err = errors.new({ kind = "http", status = 401, message = "Incorrect API key " .. key:sub(1, 15) .. "...",
      code = "bad " .. key, param = key:sub(5) })
    errors.scrub(err, errors.scrubber({ key }))
    for _, field in ipairs({ "message", "code", "param" }) do assert(not leak(err[field], key), field) end
    assert.are.equal(401, err.status)
    assert.matches("Incorrect API key %*%*%*", err.message)
    assert(not leak(tostring(err), key))
  end)
end)
