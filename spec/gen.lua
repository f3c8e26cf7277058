-- A small seeded generator for the property specs: the same seed gives the
-- same cases on every Lua (its own generator, not math.random, whose
-- sequence differs between Lua 5.1, 5.4 and LuaJIT). A failing case names
-- its seed; LBATCH_SEED runs that one again.
local G = {}
G.__index = G

-- a Park-Miller generator (31 bits, exact in a double)
function G.new(seed)
  seed = tonumber(os.getenv("LBATCH_SEED")) or seed or 1
  return setmetatable({ s = (seed % 2147483646) + 1, seed = seed }, G)
end

-- an integer in [a, b] (or [1, a])
function G:int(a, b)
  if not b then a, b = 1, a end
  self.s = (self.s * 16807) % 2147483647
  return a + self.s % (b - a + 1)
end

function G:pick(list) return list[self:int(#list)] end

function G:chance(p) return self:int(1000) <= p * 1000 end

-- a string of n bytes drawn from `alphabet` (a string), or any byte
function G:bytes(n, alphabet)
  local t = {}
  for i = 1, n do
    if alphabet then
      local k = self:int(#alphabet)
      t[i] = alphabet:sub(k, k)
    else
      t[i] = string.char(self:int(0, 255))
    end
  end
  return table.concat(t)
end

-- a piece of valid UTF-8 text: ASCII, two-, three- and four-byte characters
local CHARS = { "a", "Z", "0", " ", "-", "é", "ß", "中", "文", "€", "😀", "𝄞", "\t" }
function G:text(n)
  local t = {}
  for i = 1, n do t[i] = self:pick(CHARS) end
  return table.concat(t)
end

return G
