-- Where the join's time goes, phase by phase (make bench-join PHASES=1, or
-- lua5.4|luajit bench/join_phases.lua DIR on bench/scale.lua gen's files).
-- Each pass does one more of the join's steps than the one before, with
-- the same calls lbatch.results makes; a phase's time is the difference
-- of two passes' CPU time (os.clock), each pass the best of ROUNDS (3):
--   index    the answer files scanned into the C index of custom_ids
--   inputs   the input lines read (rules.lines)
--   lookup   each input's custom_id found and taken from the index
--   fetch    each answer's line read (core.line_at)
--   decode   each answer's fields scanned (core.result)
--   to Lua   the rest of results' each(): the light record made, the
--            request line kept, the JSON-format check
local core = require "lbatch.core"
local rules = require "lbatch.impl.formats.rules"
local results = require "lbatch.results"

local dir = assert(arg[1], "usage: bench/join_phases.lua DIR")
local ROUNDS = tonumber(os.getenv("ROUNDS")) or 3
local SPAN = 2 ^ 36
local files = { dir .. "/all.out.jsonl", dir .. "/all.err.jsonl" }
local input = dir .. "/all.in.jsonl"
local json_string, line_at, scan_result = core.json_string, core.line_at, core.result

local function pass(upto)
  local map = core.idmap()
  for k, p in ipairs(files) do assert(map:scan(p, k)) end
  if upto < 2 then map:clear() return end
  local handles = {}
  for k, p in ipairs(files) do handles[k] = assert(io.open(p, "rb")) end
  local fh = assert(io.open(input, "rb"))
  for _, text in rules.lines(fh) do
    if upto >= 3 then
      local v = map:take(json_string(text, "custom_id"))
      if v and upto >= 4 then
        local k = math.floor(v / SPAN)
        local line = line_at(handles[k], v - k * SPAN)
        if upto >= 5 then scan_result(line) end
      end
    end
  end
  fh:close()
  for _, h in ipairs(handles) do h:close() end
  map:clear()
end

local function whole()
  for rec in results.open({ output = files[1], errors = files[2], inputs = input }):each() do
    assert(rec)
  end
end

local function best(f, ...)
  local t = math.huge
  for _ = 1, ROUNDS do
    collectgarbage() collectgarbage()
    local t0 = os.clock()
    f(...)
    t = math.min(t, os.clock() - t0)
  end
  return t
end

local names = { "index", "inputs", "lookup", "fetch", "decode" }
local times, prev = {}, 0
for i = 1, 5 do
  local t = best(pass, i)
  times[i], prev = t - prev, t
end
local all = best(whole)
times[6] = all - prev
names[6] = "to Lua"
local runtime = jit and jit.version or _VERSION
local cells = {}
for i = 1, 6 do cells[i] = ("%s %.2f s (%.0f%%)"):format(names[i], times[i], 100 * times[i] / all) end
print(("%s: %s; whole %.2f s CPU"):format(runtime, table.concat(cells, ", "), all))
