-- Where the join's time goes, phase by phase (make bench-join PHASES=1, or
-- lua5.4|luajit bench/join_phases.lua DIR on bench/scale.lua gen's files).
-- Each pass does one more of the join's steps than the one before, with
-- the same calls lbatch.results makes; a phase's time is the difference
-- of two passes' CPU time (os.clock), each pass the best of ROUNDS (3):
--   index    the answer files scanned into the C index of custom_ids
--   inputs   the input lines read, a window at a time (core.window's read)
--   fetch    each window's ids taken from the index and its answers read
--            in file order (the window's fill)
--   take     each record made in C: its answer scanned, its fields, request
--            line and answer line made Lua values (the window's records,
--            256 at a time)
--   to Lua   the rest of results' each(): the join's loop in Lua, the
--            JSON-format check
-- FIELDS=status_code,content: records as each{fields = {...}} makes them.
local core = require "lbatch.core"
local results = require "lbatch.results"
local service = require "lbatch.impl.api.service"

local dir = assert(arg[1], "usage: bench/join_phases.lua DIR")
local ROUNDS = tonumber(os.getenv("ROUNDS")) or 3
local WINDOW, WINDOW_BYTES = service.LIMITS.max_lines, 16 * 1024 * 1024   -- as lbatch/results.lua
local files = { dir .. "/all.out.jsonl", dir .. "/all.err.jsonl" }
local input = dir .. "/all.in.jsonl"

local function lazy() end
local out, asks = {}, {}
-- FIELDS=a,b: the records of each{fields = {a, b}}
local fields, want = os.getenv("FIELDS"), nil
if fields and fields ~= "" then
  want = {}
  for name in fields:gmatch("[^,]+") do want[#want + 1] = name end
end
local set = want and {}
for _, name in ipairs(want or {}) do set[name] = true end

local function pass(upto)
  local map = core.idmap()
  for k, p in ipairs(files) do assert(map:scan(p, k, 0, results.MAX_INDEX + 1)) end   -- (as the join: room reserved)
  if upto < 2 then map:clear() return end
  local handles, sizes = {}, {}
  for k, p in ipairs(files) do handles[k] = assert(io.open(p, "rb")) sizes[k] = handles[k]:seek("end") end
  local fh, win, pos, done = assert(io.open(input, "rb")), core.window(), 0, false
  while not done do
    local n
    n, pos, done = win:read(fh, pos, nil, WINDOW, WINDOW_BYTES, service.LIMITS.max_line_bytes)
    local k = 1
    while upto >= 3 and k <= n do
      local last = assert(win:fill(map, k, n, handles, sizes))
      if upto >= 4 then
        for i = k, last, 256 do win:records(i, math.min(last, i + 255), lazy, out, asks, set) end
      end
      k = last + 2                                  -- (an id left to Lua: none in these files)
    end
  end
  fh:close()
  for _, h in ipairs(handles) do h:close() end
  map:clear()
end

local function whole()
  for rec in results.open({ output = files[1], errors = files[2], inputs = input }):each({ fields = want }) do
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

local names = { "index", "inputs", "fetch", "take" }
local times, prev = {}, 0
for i = 1, 4 do
  local t = best(pass, i)
  times[i], prev = t - prev, t
end
local all = best(whole)
times[5] = all - prev
names[5] = "to Lua"
local runtime = jit and jit.version or _VERSION
local cells = {}
for i = 1, 5 do cells[i] = ("%s %.2f s (%.0f%%)"):format(names[i], times[i], 100 * times[i] / all) end
print(("%s%s: %s; whole %.2f s CPU"):format(runtime, want and " (fields " .. fields .. ")" or "",
  table.concat(cells, ", "), all))
