-- Waiting and pipelines against the emulator, including kill -9 and resume.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local function stats(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats")
  return s.routes ~= cjson.null and s.routes or {}
end

local function chat_requests(path, n)
  return H.requests(path, n, { url = "/v1/chat/completions", model = "qwen-plus" })
end

describe("client:wait", function()
  local emu, client, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })  -- polls every 0.05 s
    dir = H.tmpdir()
  end)
  teardown(function() client:close() emu.stop() end)

  it("polls with backoff until the batch is final, reporting each change", function()
    local f = assert(client:upload(chat_requests(dir .. "/w.jsonl", 20)))
    local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                     metadata = { emulator_line_seconds = "10" } }))
    local seen, polls = {}, stats(emu)["GET /batches/{id}"] or 0
    local done = assert(client:wait(b.id, { interval = 0.02, factor = 1.5, max_interval = 0.1,
      on_progress = function(x) seen[#seen + 1] = x.status .. ":" .. x.request_counts.completed end }))
    assert.are.equal("completed", done.status)
    assert.are.equal("completed:20", seen[#seen])
    assert.is_true(#seen >= 3)
    for i = 2, #seen do assert.are_not.equal(seen[i - 1], seen[i]) end   -- changes only
    polls = (stats(emu)["GET /batches/{id}"] or 0) - polls
    assert.is_true(polls >= #seen and polls < 60, "polls: " .. polls)
  end)

  it("gives up at the deadline with a timeout error carrying the batch", function()
    local f = assert(client:upload(chat_requests(dir .. "/d.jsonl", 5)))
    local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                     metadata = { emulator_line_seconds = "100000" } }))
    local t0 = H.now()
    local v, err = client:wait(b.id, { interval = 0.05, deadline = 0.5 })
    assert.is_nil(v)
    assert.are.same({ "timeout", "wait_deadline" }, { err.kind, err.code })
    assert.are.equal(b.id, err.batch.id)
    assert.is_true(H.now() - t0 < 30)       -- the deadline, not the batch's end (250 s here); loose under load
    assert(client:cancel(b.id))
  end)

  it("overlaps hundreds of waits on one client", function()
    local f = assert(client:upload(chat_requests(dir .. "/many.jsonl", 2)))
    local tasks, waiting, peak = {}, 0, 0
    for i = 1, 200 do
      tasks[i] = client:spawn(function()
        local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
        waiting = waiting + 1
        peak = math.max(peak, waiting)
        local status = assert(client:wait(b.id, { interval = 0.1, max_interval = 0.5 })).status
        waiting = waiting - 1
        return status
      end)
    end
    assert(client:run())
    for _, t in ipairs(tasks) do assert.are.equal("completed", t:join()) end
    -- overlapped: most of the waits were under way at once (one after another, one at a time)
    assert.is_true(peak >= 100, "waits at once: " .. peak)
  end)
end)

describe("pipeline", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function() emu.stop() end)

  it("shards, submits, waits and merges, with at most N jobs in flight", function()
    local client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    local reqs = {}
    for i = 1, 22 do
      reqs[i] = { custom_id = "c" .. i, body = { model = "qwen-plus", messages = { { role = "user", content = "n" .. i } } } }
    end
    local max_running, progress, etas = 0, 0, 0
    local report = assert(pipeline.run({
      client = client, requests = reqs, dir = dir .. "/work", max_lines = 5, max_in_flight = 2,
      poll_interval = 0.05,
      on_progress = function(p)
        progress = progress + 1
        local running = (p.jobs.validating or 0) + (p.jobs.in_progress or 0) + (p.jobs.finalizing or 0)
        max_running = math.max(max_running, running)
        assert.are.equal(22, p.total)
        -- the time left: none before a request is done or after all are, else a whole number of seconds
        local done = p.completed + p.failed
        if done == 0 or done >= p.total then
          assert.is_nil(p.eta)
        else
          assert.is_true(p.eta ~= nil and p.eta >= 0 and p.eta < math.huge and p.eta == math.floor(p.eta), tostring(p.eta))
          etas = etas + 1
        end
      end,
    }))
    assert.is_true(etas > 0)
    client:close()
    assert.are.equal(5, #report.shards)
    assert.is_true(progress > 0)
    assert.is_true(max_running <= 2)
    local n = 0
    for rec in report.results:each() do
      n = n + 1
      assert.is_true(rec.ok)
      assert.matches("n" .. rec.custom_id:sub(2) .. "$", rec.content)
    end
    assert.are.equal(22, n)
    local st = stats(emu)
    assert.are.same({ 5, 5 }, { st["POST /files"], st["POST /batches"] })
    -- run again on the finished journal: nothing is sent
    local again = assert(pipeline.run({ client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }),
                                        requests = reqs, dir = dir .. "/work" }))
    assert.are.equal(5, #again.shards)
    assert.are.same({ 5, 5 }, { stats(emu)["POST /files"], stats(emu)["POST /batches"] })
    -- and it has every answer still: the journal held each shard's end
    local s = assert(again.results:summary())
    assert.are.same({ 22, 22, 0 }, { s.total, s.ok, s.missing })
    for _, sh in ipairs(again.shards) do assert.are.equal("completed", sh.status) end
  end)

  it("refuses broken requests before uploading anything", function()
    local client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    local v, err = pipeline.run({ client = client, dir = dir .. "/bad", requests = {
      { custom_id = "a", body = { model = "m", messages = { { role = "user", content = "x" } } } },
      { custom_id = "a", body = { model = "m", messages = { { role = "user", content = "y" } } } } } })
    client:close()
    assert.is_nil(v)
    assert.are.equal("duplicate_custom_id", err.code)
    assert.is_nil(stats(emu)["POST /files"])
  end)

  it("resubmits what an expired shard did not run, and merges both rounds", function()
    local client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    local path = chat_requests(dir .. "/exp.jsonl", 6)
    local expired = false
    local report = assert(pipeline.run({
      client = client, requests = path, dir = dir .. "/exp", poll_interval = 0.05, resubmit = true,
      -- the first round runs at 5 service hours a line: part of it expires
      metadata = function(s) return s.round == 1 and { emulator_line_seconds = "18000" } or nil end,
      on_step = function(step, s)
        if step == "waiting" and s.round == 1 and not expired then
          expired = true
          client:spawn(function()
            client:sleep(0.3)
            H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 25 * 3600 } })
          end)
        end
      end,
    }))
    client:close()
    assert.is_true(#report.shards >= 2)
    assert.are.equal("expired", report.shards[1].status)
    assert.are.equal(2, report.shards[2].round)
    assert.is_true(report.shards[2].lines >= 1 and report.shards[2].lines < 6)
    local ok = 0
    for rec in report.results:each() do if rec.ok then ok = ok + 1 end end
    assert.are.equal(6, ok)
  end)

  it("survives kill -9 at several points without uploading or creating twice", function()
    local input = chat_requests(dir .. "/crash.jsonl", 20)     -- 5 shards of 4
    local work = dir .. "/crash"
    local driver = H.root .. "/spec/fixtures/pipeline_driver.lua"
    -- one job in flight, so shards go in order; each point is still ahead
    local points = { "before_upload:2", "after_upload:2", "after_create:3", "waiting:4", "after_download:4",
                     "after_upload:5" }
    for _, point in ipairs(points) do
      local out = H.sh(("%s %s %s %s %s %s 2>&1; echo exit=$?"):format(H.lua, driver, emu.base, work, input, point))
      assert.matches("killing myself at", out, point)
      assert.matches("exit=137", out, point)
    end
    local out = H.sh(("%s %s %s %s %s 2>&1"):format(H.lua, driver, emu.base, work, input))
    assert.matches("done 5 20 20", out)
    local st = stats(emu)
    assert.are.same({ 5, 5 }, { st["POST /files"], st["POST /batches"] })
    local _, files = H.json("GET", emu.base .. "/files?purpose=batch")
    assert.are.equal(5, #files.data)
    local _, batches = H.json("GET", emu.base .. "/batches?limit=100")
    assert.are.equal(5, #batches.data)
  end)

  it("checks the free disk space before any work, with a clear error", function()
    local client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    local path = chat_requests(dir .. "/disk.jsonl", 10)
    local v, err = pipeline.run({ client = client, requests = path, dir = dir .. "/disk", disk_factor = 1e15 })
    assert.is_nil(v)
    assert.are.same({ "io", "disk_full" }, { err.kind, err.code })
    assert.matches("free; this run needs about", err.message, 1, true)
    -- and for requests given as a list, once they are sharded
    v, err = pipeline.run({ client = client, dir = dir .. "/disk2", disk_factor = 1e15, requests = {
      { custom_id = "a", body = { model = "qwen-plus", messages = { { role = "user", content = "x" } } } } } })
    assert.is_nil(v)
    assert.are.equal("disk_full", err.code)
    assert.is_nil(stats(emu)["POST /files"])
    -- the same run goes through with the check off
    assert(pipeline.run({ client = client, requests = path, dir = dir .. "/disk3", check_disk = false,
                          poll_interval = 0.05 }))
    client:close()
  end)

  it("runs 1,000 shards at once: a small journal that replays fast, list pages, every answer merged", function()
    -- poll_budget: status calls a minute; the default's pace, not the batches', set the run's length
    local client = lbatch.new({ api_key = "k", base_url = emu.base, max_connections = 16, poll_budget = 36000 })
    local reqs = {}
    for i = 1, 1000 do
      reqs[i] = { custom_id = ("req-%07d"):format(i), body = { model = "qwen-plus", messages = { { role = "user", content = "q" .. i } } } }
    end
    local report = assert(pipeline.run({ client = client, requests = reqs, dir = dir .. "/k", max_lines = 1,
                                         max_in_flight = 1000, poll_interval = 0.5, poll_factor = 1 }))
    assert.are.equal(1000, #report.shards)
    local n = 0
    for rec in report.results:each() do
      n = n + 1
      assert.is_true(rec.ok)
      assert.are.equal(("req-%07d"):format(n), rec.custom_id)
    end
    assert.are.equal(1000, n)
    local st = stats(emu)
    assert.are.same({ 1000, 1000 }, { st["POST /files"], st["POST /batches"] })
    local calls = (st["GET /batches"] or 0) + (st["GET /batches/{id}"] or 0)
    assert.is_true(calls < 1000, calls .. " status calls for 1,000 batches")
    assert.is_true(st["GET /batches"] > 0)
    local lines = 0
    for _ in io.lines(report.journal) do lines = lines + 1 end
    assert.is_true(lines <= 16 * 1000 + 1024 + 1001, lines .. " journal lines")
    -- the replay's CPU time (os.clock), not the wall clock's, which a loaded machine stretches
    local t0 = os.clock()
    local again = assert(pipeline.run({ client = client, requests = reqs, dir = dir .. "/k" }))
    local replay = os.clock() - t0
    assert.are.equal(1000, #again.shards)
    assert.is_true(replay < 1, ("replayed in %.2f s of CPU"):format(replay))
    client:close()
  end)
end)
