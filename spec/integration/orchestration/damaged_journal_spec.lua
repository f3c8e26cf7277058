-- A damaged journal never starts a new run silently: a pipeline's journal
-- emptied, cut in its header or deleted (its shards and dir/run.json still
-- there), a flow round's pipeline journal emptied, a flow's asks file cut:
-- each is refused by name, with the way to repair it, and nothing is sent
-- again. The repair the message names works.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local flow = require "lbatch.flow"
local cjson = require "cjson"

local function routes(emu)
  local s = emu.stats()
  return s.routes ~= cjson.null and s.routes or {}
end

local function requests(n)
  local list = {}
  for i = 1, n do
    list[i] = { custom_id = "r" .. i, body = { model = "qwen-plus", messages = { { role = "user", content = "q" .. i } } } }
  end
  return list
end

local FAST = { poll_interval = 0.05, max_poll_interval = 0.1, recover_window = 1 }

local function count_ok(report)
  local n, ok = 0, 0
  for rec in report.results:each() do
    n = n + 1
    if rec.ok then ok = ok + 1 end
  end
  return n, ok
end

describe("a pipeline whose journal is damaged", function()
  local emu, c
  before_each(function()
    emu = H.emulator({ speed = 500, rate_limits = false })
    c = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
  end)
  after_each(function() c:close() emu.stop() end)

  -- a run stopped after its second shard's create: 2 files, 2 batches
  local function stopped(dir)
    local o = { client = c, dir = dir, requests = requests(60), max_lines = 20, max_in_flight = 1,
      on_step = function(step, s) if step == "after_create" and s.k == 2 then error("crash") end end }
    for k, v in pairs(FAST) do o[k] = v end
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.matches("crash", tostring(err))
    o.on_step = nil
    local run = cjson.decode(H.read(dir .. "/journal.jsonl"):match("^[^\n]+")).run
    assert.are.equal(run, cjson.decode(H.read(dir .. "/run.json")).run)
    return o, run
  end

  local damages = {
    emptied = function(path) H.write(path, "") end,
    ["cut in its header"] = function(path) H.write(path, H.read(path):sub(1, 20)) end,
    deleted = function(path) os.remove(path) end,
    ["deleted with run.json"] = function(path, dir) os.remove(path) os.remove(dir .. "/run.json") end,
  }
  for what, damage in pairs(damages) do
    it("refuses a journal " .. what .. ", naming it and the command that repairs it; nothing is sent", function()
      local dir = H.tmpdir()
      local o, run = stopped(dir)
      local path = dir .. "/journal.jsonl"
      damage(path, dir)
      local report, err = pipeline.run(o)
      assert.is_nil(report)
      assert.are.equal("journal_damaged", err.code)
      assert.matches(path, err.message, 1, true)
      if what == "deleted with run.json" then
        assert.matches("lbatch adopt --run RUN --dir " .. dir, err.message, 1, true)
      else
        assert.are.equal(run, err.run)
        assert.matches("lbatch adopt --run " .. run .. " --dir " .. dir, err.message, 1, true)
      end
      assert.matches("nothing was sent", tostring(err))
      local r = routes(emu)
      assert.are.same({ 2, 2 }, { r["POST /files"], r["POST /batches"] })
    end)
  end

  it("is repaired as the message says: moved aside, adopted, run again; nothing uploaded or created twice", function()
    local dir = H.tmpdir()
    local o, run = stopped(dir)
    local path = dir .. "/journal.jsonl"
    H.write(path, "")
    local _, err = pipeline.run(o)
    assert.are.equal("journal_damaged", err.code)
    assert(os.rename(path, path .. ".damaged"))
    assert(pipeline.adopt({ client = c, dir = dir, run = run, requests = o.requests, max_lines = 20 }))
    local report = assert(pipeline.run(o))
    assert.are.same({ 60, 60 }, { count_ok(report) })
    local r = routes(emu)
    assert.are.same({ 3, 3 }, { r["POST /files"], r["POST /batches"] })
  end)

  it("refuses a journal of another run than dir/run.json names", function()
    local dir = H.tmpdir()
    local o = stopped(dir)
    H.write(dir .. "/run.json", '{"version":1,"run":"0123456789ab"}\n')
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.are.equal("journal_damaged", err.code)
    assert.matches("run.json says run 0123456789ab", err.message, 1, true)
    assert.are.same({ 2, 2 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
  end)
end)

describe("a flow whose round's files are damaged", function()
  local emu, c
  local judge = dofile(H.root .. "/spec/fixtures/judge_flow.lua")
  local function items(n)
    local list = {}
    for i = 1, n do list[i] = { id = ("q%03d"):format(i), question = ("Question %d: what is %d + %d?"):format(i, i, i) } end
    return list
  end
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    c = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
  end)
  after_each(function() c:close() emu.stop() end)

  local function options(dir, stop_at)
    return { client = c, dir = dir, items = items(30), key = judge.key, step = judge.step, max_lines = 10,
      poll_interval = 0.05, recover_window = 1,
      on_step = stop_at and function(step) if step == stop_at then error("stop") end end or nil }
  end

  it("refuses round 1's pipeline journal emptied, naming it; round 1 is not sent again", function()
    local dir = H.tmpdir()
    local _, err = flow.run(options(dir, "waiting"))
    assert.matches("stop", tostring(err))
    local before = routes(emu)
    local path = dir .. "/round-1/batches/journal.jsonl"
    H.write(path, "")
    local report
    report, err = flow.run(options(dir))
    assert.is_nil(report)
    assert.are.equal("journal_damaged", err.code)
    assert.matches(path, err.message, 1, true)
    local after = routes(emu)
    assert.are.same({ before["POST /files"], before["POST /batches"] }, { after["POST /files"], after["POST /batches"] })
    -- repaired as the message says: aside, adopted with the round's files, run again
    assert.matches("pipeline.adopt{run = \"" .. err.run .. "\"", err.message, 1, true)
    assert(os.rename(path, path .. ".damaged"))
    local st = cjson.decode(H.read(dir .. "/flow.json"))
    local found = assert(pipeline.adopt({ client = c, dir = dir .. "/round-1/batches", run = err.run,
                                          manifest = { files = st.rounds[1].files } }))
    assert.are.equal(found.shards, found.batches)            -- every batch of round 1 found
    report = assert(flow.run(options(dir)))
    assert.are.same({ 30, 30, 0 }, { report.items, report.done, report.failed })
    local r = routes(emu)
    local _, files = H.json("GET", emu.base .. "/files?purpose=batch&limit=100")
    local names = {}
    for _, f in ipairs(files.data) do
      assert.is_nil(names[f.filename], f.filename .. " uploaded twice")
      names[f.filename] = true
    end
    assert.are.equal(r["POST /files"], #files.data)          -- nothing uploaded twice
    assert.are.equal(r["POST /batches"], r["POST /files"])   -- one batch a file
  end)

  for _, at in ipairs({ "before_upload", "waiting" }) do
    it("refuses round 1's asks file cut in half (stopped at " .. at .. "), naming it; nothing more is sent", function()
      local dir = H.tmpdir()
      local _, err = flow.run(options(dir, at))
      assert.matches("stop", tostring(err))
      local before = routes(emu)
      local path = dir .. "/round-1/asks.jsonl"
      local text = assert(H.read(path))
      H.write(path, text:sub(1, math.floor(#text / 2)))
      local report
      report, err = flow.run(options(dir))
      assert.is_nil(report)
      assert.are.equal("asks_damaged", err.code)
      assert.matches(path, err.message, 1, true)
      assert.matches("cut or changed", err.message, 1, true)
      local after = routes(emu)
      assert.are.same({ before["POST /files"] or 0, before["POST /batches"] or 0 },
                      { after["POST /files"] or 0, after["POST /batches"] or 0 })
    end)
  end
end)
