-- The kill -9 soak of the pipeline and the flow: runs of the spec drivers
-- (spec/fixtures/pipeline_driver.lua, flow_driver.lua) killed at random
-- moments against an emulator that makes uploads and creates late
-- (slow_commit), restarted at once or after a pause, until each job ends;
-- then every job is held to the rules: every request answered once, no
-- upload and no batch made twice. `make soak` runs hundreds of kills
-- (spec/soak/run); integration/public/recovery_spec a few.
local H = require "helper"
local cjson = require "cjson"
local lbatch = require "lbatch"

local M = {}

local function routes(emu)
  local s = emu.stats()
  return type(s.routes) == "table" and s.routes or {}
end
M.routes = routes

-- one run in the background, killed after `after` seconds (nil: run to
-- its end): true when the kill found it running (exit 137); its exit code
local function run_killed(cmd, after, log)
  local tail = after and ("& p=$!; sleep %.3f; kill -9 $p 2>/dev/null; wait $p"):format(after) or ""
  local out = H.sh(("{ %s > %s 2>&1 %s; } 2>/dev/null; echo exit=$?"):format(cmd, log, tail))
  local code = tonumber(out:match("exit=(%d+)"))
  return code == 137, code
end

-- every object on the emulator: files by name, batches, and the lines
-- their outputs answered (custom_id -> times)
local function inventory(emu)
  local c = lbatch.new({ api_key = "k", base_url = emu.base })
  local files, batches, answers = {}, {}, {}
  for f, err in c:each_file({ limit = 100 }) do
    assert(f, tostring(err))
    if f.purpose == "batch" then files[f.filename] = (files[f.filename] or 0) + 1 end
  end
  for b, err in c:each_batch({ limit = 100 }) do
    assert(b, tostring(err))
    batches[#batches + 1] = b
    if b.status == "completed" and type(b.output_file_id) == "string" then
      local text = assert(c:content(b.output_file_id))
      for line in text:gmatch("[^\n]+") do
        local id = (b.metadata and b.metadata.lbatch_run or "?") .. ":" .. cjson.decode(line).custom_id
        answers[id] = (answers[id] or 0) + 1
      end
    end
  end
  c:close()
  return files, batches, answers
end

-- Kill and restart one job until it ends; figures counted into `fig`.
-- o: cmd (the driver's command line), dir, kills (the most for this job),
-- pause (the chance of a pause before a restart), min, max (the kill's
-- moment after a start, seconds), rand (math.random)
local function job(o, fig)
  local rand = o.rand or math.random
  for i = 1, o.kills + 1 do
    local after = i <= o.kills and o.min + (o.max - o.min) * rand() or nil
    local killed, code = run_killed(o.cmd, after, ("%s/run-%d.log"):format(o.dir, i))
    if not killed then
      assert(code == 0, ("%s: exit %s: %s"):format(o.dir, tostring(code),
        H.read(("%s/run-%d.log"):format(o.dir, i)) or ""))
      return H.read(("%s/run-%d.log"):format(o.dir, i))
    end
    fig.kills = fig.kills + 1
    if rand() < o.pause then
      fig.paused = fig.paused + 1
      H.sleep(0.2 + 1.5 * rand())
    else
      fig.at_once = fig.at_once + 1
    end
  end
end

-- one pipeline job (number j): its run id
local function pipeline_job(o, fig, emu, root, j, window)
  local dir = ("%s/p%d"):format(root, j)
  H.mkdir(dir)
  local lines = o.lines or 60
  local input = H.requests(dir .. "/in.jsonl", lines, { url = "/v1/chat/completions", model = "qwen-plus",
    prefix = "p" .. j .. "-" })
  local cmd = ("DRIVER_MAX_LINES=10 DRIVER_MAX_IN_FLIGHT=6 DRIVER_RECOVER_WINDOW=%s %s %s %s %s %s"):format(window,
    H.lua, H.root .. "/spec/fixtures/pipeline_driver.lua", emu.base, dir .. "/work", input)
  local out = job({ cmd = cmd, dir = dir, kills = o.kills, pause = o.pause or 0.5, min = 0.05, max = o.max or 1.2 }, fig)
  assert(out:find(("done %d %d %d"):format(math.ceil(lines / 10), lines, lines), 1, true), out)
  fig.jobs, fig.requests = fig.jobs + 1, fig.requests + lines
  return cjson.decode(H.read(dir .. "/work/run.json")).run
end

local function flow_job(o, fig, emu, root, j, window)
  local dir = ("%s/f%d"):format(root, j)
  H.mkdir(dir)
  local cmd = ("LBATCH_ROOT=%s FLOW_MAX_LINES=25 FLOW_RECOVER_WINDOW=%s %s %s %s %s %d"):format(H.q(H.root), window,
    H.lua, H.root .. "/spec/fixtures/flow_driver.lua", emu.base, dir .. "/work", o.items or 100)
  local out = job({ cmd = cmd, dir = dir, kills = o.kills, pause = o.pause or 0.5, min = 0.05, max = o.max or 2 }, fig)
  local items, done, failed = out:match("done (%d+) (%d+) (%d+)")
  assert(tonumber(items) == (o.items or 100) and done == items and failed == "0", out)
  fig.jobs, fig.flows = fig.jobs + 1, fig.flows + 1
end

--- The soak: pipeline jobs and flow jobs in turn (o.flow_every: a flow
-- job every that many, default 3), each killed up to `o.kills` times (the
-- last run goes to its end), on one emulator with slow_commit `o.slow`
-- seconds, until `o.target` kills were made, or `o.jobs` jobs ran, or
-- `o.seconds` passed; returns the figures (and the emulator) once every
-- rule held (an assert fails the first one broken).
function M.soak(o)
  local emu = H.emulator({ speed = o.speed or 200, rate_limits = false })
  local status = H.json("POST", emu.url .. "/_emulator/modes", { json = { slow_commit = { seconds = o.slow } } })
  assert(status == 200)
  local fig = { kills = 0, at_once = 0, paused = 0, jobs = 0, flows = 0, requests = 0 }
  local root, runs, t0 = H.tmpdir(), {}, H.now()
  local window = ("%g"):format(o.window or o.slow * 3 + 1)
  local every = o.flow_every or 3
  local ok, err = pcall(function()
    while fig.kills < (o.target or math.huge) and fig.jobs < (o.jobs or math.huge)
      and H.now() - t0 < (o.seconds or math.huge) do
      if (fig.jobs + 1) % every == 0 then
        flow_job(o, fig, emu, root, fig.flows + 1, window)
      else
        runs[#runs + 1] = pipeline_job(o, fig, emu, root, #runs + 1, window)
      end
    end
    M.check(emu, fig, runs, o)
  end)
  if not ok then emu.stop() error(err, 0) end
  return fig, emu
end

-- the rules, over everything the emulator holds
function M.check(emu, fig, runs, o)
  local files, batches, answers = inventory(emu)
  local r = routes(emu)
  -- figures: the requests that reached the server (some cut by a kill
  -- before they were read), the files and batches made, the lines answered
  fig.uploads, fig.creates, fig.files, fig.batches, fig.answers = r["POST /files"] or 0, r["POST /batches"] or 0,
    0, #batches, 0
  for name, n in pairs(files) do
    assert(n == 1, ("%s uploaded %d times"):format(name, n))
    fig.files = fig.files + 1
  end
  local per = {}
  for _, b in ipairs(batches) do
    local key = tostring(b.input_file_id)
    per[key] = (per[key] or 0) + 1
    assert(per[key] == 1, ("two batches from %s"):format(key))
  end
  for id, n in pairs(answers) do
    assert(n == 1, ("%s answered %d times"):format(id, n))
    fig.answers = fig.answers + 1
  end
  for j, run in ipairs(runs) do
    for i = 1, (o.lines or 60) do
      assert(answers[("%s:p%d-%d"):format(run, j, i)] == 1, ("run %s: request %d not answered once"):format(run, i))
    end
  end
  return fig
end

return M
