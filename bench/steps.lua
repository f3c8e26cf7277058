-- The game loop of spec/integration/hosts_spec.lua (#timing), measured:
-- a pipeline of 100 jobs driven by client:step() once per frame at 120
-- frames a second, two warm-up pipelines, then one judged round, for which
-- it prints the steps' CPU (p50, p99, max, over 2 ms), LuaJIT's trace
-- events per kind (aborts with their reasons and places) and the steps
-- whose heap grew over 64 KB, with what they were doing (issue 34).
--
--   make build && env LUA_PATH="./?.lua;./?/init.lua;./spec/?.lua;;" \
--     LUA_CPATH="./build/jit/?.so;;" LBATCH_ROOT=$PWD luajit bench/steps.lua [ROUNDS]
--
-- (Lua 5.4 works too, with build/5.4 and lua5.4: no trace events then.)
-- BENCH_ATTRIBUTE=0: no attribution of the big steps (its wrappers are
-- code of their own, traced too): the bare loop's figures. Another tree's
-- lbatch (a before): LUA_PATH="OTHER/?.lua;OTHER/?/init.lua;./spec/?.lua;;".
-- ROUNDS: judged rounds (default 1). It starts an emulator like the spec
-- (spec/helper.lua), on the other CPUs when there are some.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local core = require "lbatch.core"

local ROUNDS = tonumber(arg and arg[1]) or 1
local jit = rawget(_G, "jit")

-- ------------------------------------------------------------ trace events

local events = { on = false, start = 0, stop = 0, abort = 0, flush = 0, lbatch = 0, aborts = {}, starts = {} }
local step_events = 0                  -- events in the current step
if jit then
  local funcinfo = require("jit.util").funcinfo
  local vmdef = require "jit.vmdef"
  local function place(func, pc)
    local info = funcinfo(func, pc)
    return (info.source or "?"):gsub("^@", "") .. ":" .. tostring(info.currentline or info.linedefined or "?")
  end
  local function reason(otr, oex)
    local text = vmdef.traceerr[otr]
    if text and oex then
      if text:find("bytecode %d", 1, true) then
        return (text:gsub("%%d", (vmdef.bcnames:sub(oex * 6 + 1, oex * 6 + 6):gsub(" ", ""))))
      end
      if text:find("%s", 1, true) then return (text:gsub("%%s", tostring(vmdef.ffnames[oex] or oex))) end
      return (text:gsub("%%d", tostring(oex)))
    end
    return text or tostring(otr)
  end
  jit.attach(function(what, _, func, pc, otr, oex)
    if not events.on then return end
    step_events = step_events + 1
    events[what] = (events[what] or 0) + 1
    if what ~= "flush" and place(func, pc):find("lbatch/", 1, true) then events.lbatch = events.lbatch + 1 end
    if what == "start" then
      local key = place(func, pc) .. (otr and otr ~= 0 and " (a side trace)" or " (a root trace)")
      events.starts[key] = (events.starts[key] or 0) + 1
    end
    if what == "abort" then
      local key = reason(otr, oex) .. " at " .. place(func, pc)
      events.aborts[key] = (events.aborts[key] or 0) + 1
    end
  end, "trace")
end

-- ------------------------------------------------------------ what a step did

-- A step's heap growth and CPU put down to what it ran: each task resume
-- (labelled by where the task stopped: the lbatch frames of its stack, or
-- "done"), each function run at the turn's end (the pipeline's journal
-- flush), each user callback; the rest is the loop's own (the core's I/O,
-- completions, timers). Set BENCH_ATTRIBUTE=0 to time the bare loop.
local doing = {}
local function note(label, kb, ms)
  local d = doing[label]
  if not d then d = { kb = 0, ms = 0 } doing[label] = d end
  d.kb, d.ms = d.kb + kb, d.ms + ms
end
local function where(co)
  if coroutine.status(co) == "dead" then return "finished" end
  local out = {}
  for level = 0, 30 do
    local info = debug.getinfo(co, level, "Sl")
    if not info then break end
    local src = info.short_src or "?"
    if src:find("lbatch/", 1, true) and not src:find("transport/loop.lua", 1, true) then
      out[#out + 1] = src:gsub("^.*lbatch/", "") .. ":" .. tostring(info.currentline)
      if #out == 3 then break end
    end
  end
  return #out > 0 and table.concat(out, " < ") or "?"
end
local ATTRIBUTE = os.getenv("BENCH_ATTRIBUTE") ~= "0"
if ATTRIBUTE then
  local Loop = require "lbatch.impl.transport.loop"
  local resume, at_turn_end, callback = Loop.resume, Loop.at_turn_end, Loop.callback
  local depth = 0
  local stopped = setmetatable({}, { __mode = "k" })     -- task -> where it last stopped
  function Loop:resume(task, ...)
    depth = depth + 1
    if depth > 1 then local r = resume(self, task, ...) depth = depth - 1 return r end
    local k0, c0 = collectgarbage("count"), os.clock()
    resume(self, task, ...)
    local kb, ms = collectgarbage("count") - k0, (os.clock() - c0) * 1000
    local stop = where(task.co)
    note(("task %s -> %s"):format(stopped[task] or "start", stop), kb, ms)
    stopped[task] = stop
    depth = depth - 1
  end
  function Loop:at_turn_end(fn)
    return at_turn_end(self, function()
      local k0, c0 = collectgarbage("count"), os.clock()
      fn()
      note("turn end (journal flush)", collectgarbage("count") - k0, (os.clock() - c0) * 1000)
    end)
  end
  function Loop:callback(fn, ...)
    local k0, c0 = collectgarbage("count"), os.clock()
    callback(self, fn, ...)
    note("callback", collectgarbage("count") - k0, (os.clock() - c0) * 1000)
  end
end
local function described(kb, ms)
  local keys, out, kb_left, ms_left = {}, {}, kb, ms
  for k in pairs(doing) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return doing[a].kb > doing[b].kb end)
  for _, k in ipairs(keys) do
    local d = doing[k]
    kb_left, ms_left = kb_left - d.kb, ms_left - d.ms
    if d.kb >= 4 or d.ms >= 0.2 then out[#out + 1] = ("%s %.0f KB %.2f ms"):format(k, d.kb, d.ms) end
  end
  out[#out + 1] = ("the loop's own %.0f KB %.2f ms"):format(kb_left, ms_left)
  return table.concat(out, "; ")
end

-- ------------------------------------------------------------ the loop

local function spin(n)
  local x = 0
  for i = 1, n do x = (x + i) % 1000003 end
  return x
end

local function frame_loop(client, shards, judged)
  local requests = {}
  for i = 1, shards * 2 do
    local messages = { { role = "user", content = "x" .. i } }
    requests[i] = { custom_id = "r" .. i, body = { model = "qwen-plus", messages = messages } }
  end
  local report, dir = nil, H.tmpdir()
  local job = client:spawn(function()
    report = assert(pipeline.run({
      client = client, requests = requests, dir = dir, max_lines = 2, max_in_flight = shards,
      poll_interval = 0.2, max_poll_interval = 0.5,
      metadata = { emulator_line_seconds = "300" },
    }))
  end)
  collectgarbage("collect")
  collectgarbage("stop")
  local steps = {}
  local deadline = core.now() + 60
  events.on = judged
  while not job:done() and core.now() < deadline do
    local t0 = core.now()
    for k in pairs(doing) do doing[k] = nil end
    step_events = 0
    local k0, c0 = collectgarbage("count"), os.clock()
    local _, failure = client:step()
    local cpu, kb = (os.clock() - c0) * 1000, collectgarbage("count") - k0
    if failure then error(failure) end
    local what = ATTRIBUTE and (kb > 64 or cpu > 2) and described(kb, cpu) or ""
    steps[#steps + 1] = { cpu = cpu, kb = kb, traces = step_events, what = what }
    spin(1000)
    collectgarbage("step", 64)
    collectgarbage("stop")
    core.sleep(math.max(0, 1 / 120 - (core.now() - t0)))
  end
  events.on = false
  collectgarbage("restart")
  assert(job:done(), "the pipeline did not finish in 60 s")
  assert(#report.shards == shards)
  H.rm_rf(dir)
  return steps
end

local function pct(list, p)
  local t = {}
  for i, s in ipairs(list) do t[i] = s.cpu end
  table.sort(t)
  return t[math.max(1, math.ceil(#t * p))]
end

local function summary(name, steps)
  local over, traced, slow_traced, big = 0, 0, 0, {}
  for i, s in ipairs(steps) do
    if s.cpu > 2 then over = over + 1 end
    if s.traces > 0 then traced = traced + 1 if s.cpu > 2 then slow_traced = slow_traced + 1 end end
    if s.kb > 64 then big[#big + 1] = i end
  end
  print(("%s: %d steps, CPU p50 %.3f ms, p99 %.3f ms, max %.3f ms; over 2 ms: %d (%d of them with trace events);"
    .. " steps with trace events: %d; heap over 64 KB: %d steps")
    :format(name, #steps, pct(steps, 0.5), pct(steps, 0.99), pct(steps, 1), over, slow_traced, traced, #big))
  return over, big
end

local function main()
  local others
  local n = tonumber(H.sh("nproc"):match("%d+")) or 1
  if n >= 2 and H.ok("command -v taskset >/dev/null") then
    H.ok("taskset -pc 0 " .. H.pid .. " >/dev/null")
    others = "1-" .. (n - 1)
  end
  local emu = H.emulator({ speed = 200, rate_limits = false, cpu = others })
  local client = lbatch.new({ api_key = "k", base_url = emu.base, max_connections = 32 })
  local ok, err = pcall(function()
    for w = 1, jit and 2 or 0 do summary("warm-up " .. w, frame_loop(client, 100, false)) end
    for r = 1, ROUNDS do
      for _, k in ipairs({ "start", "stop", "abort", "flush", "lbatch" }) do events[k] = 0 end
      events.aborts, events.starts = {}, {}
      local steps = frame_loop(client, 100, true)
      local _, big = summary("judged " .. r, steps)
      if jit then
        print(("  trace events: start %d, stop %d, abort %d, flush %d; in lbatch's code %d (the rest: this script's)")
          :format(events.start, events.stop, events.abort, events.flush, events.lbatch))
        local keys = {}
        for k in pairs(events.aborts) do keys[#keys + 1] = k end
        table.sort(keys, function(a, b) return events.aborts[a] > events.aborts[b] end)
        for _, k in ipairs(keys) do print(("    %4d abort: %s"):format(events.aborts[k], k)) end
        keys = {}
        for k in pairs(events.starts) do keys[#keys + 1] = k end
        table.sort(keys, function(a, b) return events.starts[a] > events.starts[b] end)
        for i = 1, math.min(#keys, 25) do print(("    %4d start: %s"):format(events.starts[keys[i]], keys[i])) end
      end
      for _, i in ipairs(big) do
        local s = steps[i]
        print(("  step %d: %.0f KB, %.2f ms CPU, %d trace events%s"):format(i, s.kb, s.cpu, s.traces,
          s.what ~= "" and ": " .. s.what or ""))
      end
      for i, s in ipairs(steps) do
        if s.cpu > 2 then
          print(("  slow step %d: %.2f ms CPU, %.0f KB, %d trace events%s"):format(i, s.cpu, s.kb, s.traces,
            s.what ~= "" and ": " .. s.what or ""))
        end
      end
    end
  end)
  client:close()
  emu.stop()
  if n >= 2 then H.ok(("taskset -pc 0-%d %d >/dev/null"):format(n - 1, H.pid)) end
  assert(ok, err)
end

main()
