-- The pipeline against the failures users of batch APIs meet, each one
-- switched on in the emulator (emulator/run --help, "modes"): an
-- enqueued-token quota, an account in arrears, a cost cap, stuck batches,
-- fresh ids that are not there yet, downloads cut midway, and every batch
-- stamped with its run and shard.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local function routes(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats", { cacert = emu.tls })
  return s.routes ~= cjson.null and s.routes or {}, s
end

local function hits(st) return type(st.modes_hit) == "table" and st.modes_hit or {} end

local function modes(emu, m)
  local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = m, cacert = emu.tls })
  assert.are.equal(200, status, cjson.encode(body))
end

-- n chat requests of exactly `tokens` prompt tokens each on the emulator's
-- count (a quarter of the prompt's bytes)
local function requests(n, tokens, model)
  local list = {}
  for i = 1, n do
    local text = ("q%06d "):format(i)
    text = text .. ("x"):rep(tokens * 4 - #text)
    list[i] = { custom_id = "r" .. i, body = { model = model or "qwen-plus", max_tokens = 10,
                                               messages = { { role = "user", content = text } } } }
  end
  return list
end

local function client(emu, o)
  o = o or {}
  o.api_key, o.base_url, o.poll_budget = "k", emu.base, 6000
  return assert(lbatch.new(o))
end

local FAST = { poll_interval = 0.05, max_poll_interval = 0.1, quota_poll = 0.05, quota_backoff = 0.05 }
local function opts(t)
  for k, v in pairs(FAST) do if t[k] == nil then t[k] = v end end
  return t
end

local function count_ok(report)
  local n, ok = 0, 0
  for rec in report.results:each() do
    n = n + 1
    if rec.ok then ok = ok + 1 end
  end
  return n, ok
end

describe("pipeline under an enqueued-token quota", function()
  for _, dialect in ipairs({ "openai", "dashscope" }) do
    it("completes every shard with no second upload, re-creating the refused ones (" .. dialect .. ")", function()
      local emu = H.emulator({ speed = 500, rate_limits = false, dialect = dialect })
      modes(emu, { token_limit = { tokens = 700 } })    -- 6 shards of 200 tokens: 3 fit
      local c = client(emu, { region = dialect == "openai" and "openai" or "cn" })
      local delays = 0
      local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(120, 10),
        max_lines = 20, max_in_flight = 6,
        on_step = function(step) if step == "quota_delay" then delays = delays + 1 end end }))
      local n, ok = count_ok(report)
      assert.are.equal(120, n)
      assert.are.equal(120, ok)
      local r, st = routes(emu)
      assert.are.equal(6, r["POST /files"])                     -- never uploaded twice
      assert.is_true(r["POST /batches"] > 6, "some shards were created again")
      assert.is_true(delays > 0)
      assert.is_true(hits(st).token_limit > 0)
      for _, s in ipairs(report.shards) do assert.are.equal("completed", s.status) end
      c:close()
      emu.stop()
    end)
  end

  it("keeps to a configured max_enqueued_tokens: nothing is refused", function()
    local emu = H.emulator({ speed = 500, rate_limits = false, dialect = "openai" })
    modes(emu, { token_limit = { tokens = 700 } })
    local c = client(emu, { region = "openai" })
    local delays = 0
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(120, 10),
      max_lines = 20, max_in_flight = 6, max_enqueued_tokens = 650,   -- the estimate's count is near the service's
      on_step = function(step) if step == "quota_delay" then delays = delays + 1 end end }))
    assert.are.same({ 120, 120 }, { count_ok(report) })
    local r, st = routes(emu)
    assert.are.equal(6, r["POST /batches"])
    assert.are.equal(0, delays)
    assert.is_nil(hits(st).token_limit)
    c:close()
    emu.stop()
  end)

  it("waits out a quota that answers 400 at create (fail_fast)", function()
    local emu = H.emulator({ speed = 500, rate_limits = false, dialect = "openai" })
    modes(emu, { token_limit = { tokens = 700, fail_fast = true } })
    local c = client(emu, { region = "openai" })
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(120, 10),
      max_lines = 20, max_in_flight = 6 }))
    assert.are.same({ 120, 120 }, { count_ok(report) })
    assert.are.equal(6, routes(emu)["POST /files"])
    c:close()
    emu.stop()
  end)
end)

describe("pipeline with an account in arrears", function()
  it("stops at the first batch whose every line fails Arrearage, and resumes once it is paid (dashscope)", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    modes(emu, { arrears = { after = 1 } })
    local c = client(emu)
    local dir = H.tmpdir()
    local o = opts{ client = c, dir = dir, requests = requests(100, 10), max_lines = 20, max_in_flight = 1 }
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.are.equal("Arrearage", err.code)
    assert.is_true(err.account)
    local r = routes(emu)
    assert.are.equal(2, r["POST /files"])                  -- the third shard never went out
    assert.are.equal(2, r["POST /batches"])
    modes(emu, { arrears = false })
    report = assert(pipeline.run(o))
    assert.are.same({ 100, 100 }, { count_ok(report) })
    r = routes(emu)
    assert.are.equal(5, r["POST /files"])                  -- the failed shard's file is used again
    assert.are.equal(6, r["POST /batches"])
    c:close()
    emu.stop()
  end)

  it("stops at the first create refused with insufficient_quota (openai), not retrying it", function()
    local emu = H.emulator({ speed = 500, rate_limits = false, dialect = "openai" })
    modes(emu, { arrears = { after = 1 } })
    local c = client(emu, { region = "openai" })
    local report, err = pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(100, 10),
      max_lines = 20, max_in_flight = 1 })
    assert.is_nil(report)
    assert.are.equal("insufficient_quota", err.code)
    local r = routes(emu)
    assert.are.equal(2, r["POST /files"])                  -- one stored, one refused once: not retried
    assert.are.equal(1, r["POST /batches"])
    c:close()
    emu.stop()
  end)
end)

describe("pipeline with a spending cap", function()
  local prices = { ["qwen-plus"] = { input = 1000, output = 1000 } }   -- per million tokens

  it("refuses before anything is uploaded when the run may cost more than max_cost", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    local c = client(emu)
    -- 100 requests x (10 input + 10 max output) tokens x 1000 / 1e6 x 0.5 = 1.0
    local report, err = pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(100, 10),
      max_lines = 20, prices = prices, max_cost = 0.9 })
    assert.is_nil(report)
    assert.are.equal("max_cost", err.code)
    assert.matches("nothing was sent", err.message)
    assert.is_nil(routes(emu)["POST /files"])
    report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(100, 10),
      max_lines = 20, prices = prices, max_cost = 1.1 }))
    assert.are.same({ 100, 100 }, { count_ok(report) })
    c:close()
    emu.stop()
  end)
end)

describe("pipeline with stuck batches", function()
  it("reports a batch held in validating, cancels it and runs its requests again", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    modes(emu, { hold = { status = "validating", seconds = 1e6 } })
    local c = client(emu)
    local stuck = {}
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(10, 10),
      -- 1 s: the next round's batch (0.02 s validating here) never looks stuck on a loaded machine
      stuck_after = 1, stuck_action = "cancel_resubmit",
      on_stuck = function(b, seconds) stuck[#stuck + 1] = { b.status, seconds } end,
      -- the next round runs: released once it is made, not when the stuck one is reported (released
      -- then, the stuck batch could complete before its cancel arrives)
      on_step = function(step, s) if step == "after_create" and s.round == 2 then modes(emu, { hold = false }) end end }))
    assert.are.equal(1, #stuck)
    assert.are.equal("validating", stuck[1][1])
    assert.is_true(stuck[1][2] >= 1)
    assert.are.same({ 10, 10 }, { count_ok(report) })
    assert.are.equal(2, #report.shards)
    assert.are.equal("cancelled", report.shards[1].status)
    assert.are.equal("completed", report.shards[2].status)
    c:close()
    emu.stop()
  end)
end)

describe("pipeline through the service's consistency delays and cut downloads", function()
  it("waits through fresh ids that 404 and resumes cut downloads", function()
    local emu = H.emulator({ speed = 100, rate_limits = false })
    modes(emu, { consistency_delay = { seconds = 50 }, cut_download = { bytes = 2000 } })   -- 0.5 s each here
    local c = client(emu)
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(40, 10),
      max_lines = 20 }))
    assert.are.same({ 40, 40 }, { count_ok(report) })
    local _, st = routes(emu)
    assert.is_true(hits(st).consistency_delay > 0)
    assert.is_true(hits(st).cut_download > 0)
    c:close()
    emu.stop()
  end)
end)

describe("pipeline stamps", function()
  it("every batch with its run and shard (and ds_name on DashScope), beside the given metadata", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    local c = client(emu)
    local dir = H.tmpdir()
    local report = assert(pipeline.run(opts{ client = c, dir = dir, requests = requests(40, 10), max_lines = 20,
      metadata = { team = "eval" } }))
    local run = cjson.decode(H.read(dir .. "/journal.jsonl"):match("^[^\n]+")).run
    local seen = {}
    for _, s in ipairs(report.shards) do
      local b = assert(c:retrieve(s.batch_id))
      assert.are.equal(run, b.metadata.lbatch_run)
      assert.are.equal("eval", b.metadata.team)
      assert.are.equal("lbatch-" .. run .. "-" .. b.metadata.lbatch_shard, b.metadata.ds_name)
      seen[b.metadata.lbatch_shard] = true
    end
    assert.are.same({ ["1"] = true, ["2"] = true }, seen)
    c:close()
    emu.stop()
  end)
end)

describe("pipeline after a lost journal", function()
  it("adopts the run from the account's files and batches: nothing uploaded or created twice", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    local c = client(emu)
    local dir = H.tmpdir()
    local o = opts{ client = c, dir = dir, requests = requests(60, 10), max_lines = 20, max_in_flight = 1,
      on_step = function(step, s) if step == "after_create" and s.k == 2 then error("crash") end end }
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.matches("crash", tostring(err))
    local run = cjson.decode(H.read(dir .. "/journal.jsonl"):match("^[^\n]+")).run
    os.remove(dir .. "/journal.jsonl")                        -- lost
    local r = routes(emu)
    assert.are.same({ 2, 2 }, { r["POST /files"], r["POST /batches"] })
    o.on_step = nil
    local found = assert(pipeline.adopt({ client = c, dir = dir, run = run, requests = o.requests, max_lines = 20 }))
    assert.are.same({ run = run, shards = 3, files = 2, batches = 2 }, found)
    local again, aerr = pipeline.adopt({ client = c, dir = dir, run = run, requests = o.requests, max_lines = 20 })
    assert.is_nil(again)
    assert.are.equal("journal_exists", aerr.code)
    report = assert(pipeline.run(o))
    assert.are.same({ 60, 60 }, { count_ok(report) })
    r = routes(emu)
    assert.are.same({ 3, 3 }, { r["POST /files"], r["POST /batches"] })
    c:close()
    emu.stop()
  end)
end)

describe("pipeline killed at random moments under a quota", function()
  it("ends with every request answered once, no file uploaded twice", function()
    local emu = H.emulator({ speed = 10, rate_limits = false, dialect = "openai" })   -- a batch takes ~2 s
    modes(emu, { token_limit = { tokens = 350 } })      -- 6 shards of 100 tokens: 3 fit
    local dir = H.tmpdir()
    local input = dir .. "/in.jsonl"
    local fh = assert(io.open(input, "wb"))
    for _, r in ipairs(requests(60, 10)) do
      fh:write(cjson.encode({ custom_id = r.custom_id, method = "POST", url = "/v1/chat/completions", body = r.body }), "\n")
    end
    fh:close()
    local driver = H.root .. "/spec/fixtures/pipeline_driver.lua"
    local env = "LBATCH_POLL_INTERVAL=0.05 DRIVER_MAX_LINES=10 DRIVER_MAX_IN_FLIGHT=6"
    local run = ("%s %s %s %s %s %s"):format(env, H.lua, driver, emu.base, dir .. "/work", input)
    -- the first run is killed once it has met the quota (a slow machine's
    -- random kills could otherwise each let one more shard through alone,
    -- and the quota never be met); the others at random moments
    local pid = tonumber(H.sh(("%s > %s/run-1.log 2>&1 & echo $!"):format(run, dir)):match("%d+"))
    assert.truthy(H.await(function()
      local _, st0 = routes(emu)
      return (hits(st0).token_limit or 0) > 0
    end, 120), "the first run never met the quota:\n" .. (H.read(dir .. "/run-1.log") or ""))
    H.ok("kill -9 " .. pid .. " 2>/dev/null")
    H.await(function() return not H.running(pid) end, 30)
    local killed, i = 1, 1
    while killed < 5 and i < 20 do             -- a run that finishes first is not a kill
      i = i + 1
      local after = 0.2 + 0.5 * math.random()
      local out = H.sh(("%s > %s/run-%d.log 2>&1 & p=$!; sleep %.2f; kill -9 $p 2>/dev/null; "
        .. "wait $p; echo exit=$?"):format(run, dir, i, after))
      if out:find("exit=137", 1, true) then killed = killed + 1 end
    end
    assert.is_true(killed >= 5, ("killed %d of %d runs"):format(killed, i))
    local out = H.sh(("%s %s %s %s %s %s 2>&1"):format(env, H.lua, driver, emu.base, dir .. "/work", input))
    assert.matches("done 6 60 60", out)
    local r, st = routes(emu)
    -- never uploaded twice: the service holds one input file a shard (its
    -- files, not the uploads it saw: one cut by a kill -9 before its body
    -- was read is seen, and makes nothing)
    -- (and none twice under one shard's name; a shard's batches may be
    -- several here: a batch over the quota is made, and fails)
    local m = H.made(emu)
    for name, n in pairs(m.files) do assert.are.equal(1, n, name .. ": " .. m.text) end
    assert.are.equal(6, m.nfiles, m.text)
    assert.is_true(r["POST /files"] >= 6)
    assert.is_true(r["POST /batches"] >= 6)
    assert.is_true(hits(st).token_limit > 0, "the quota was met")
    -- every request answered once: the batches that completed hold each line once
    local seen = {}
    local _, page = H.json("GET", emu.base .. "/batches?limit=100", { cacert = emu.tls })
    for _, b in ipairs(page.data) do
      if b.status == "completed" then
        local _, text = H.http("GET", emu.base .. "/files/" .. b.output_file_id .. "/content", { cacert = emu.tls })
        for line in text:gmatch("[^\n]+") do
          local id = cjson.decode(line).custom_id
          seen[id] = (seen[id] or 0) + 1
        end
      end
    end
    local n = 0
    for id, times in pairs(seen) do
      n = n + 1
      assert.are.equal(1, times, id .. " answered more than once")
    end
    assert.are.equal(60, n)
    emu.stop()
  end)
end)

describe("pipeline with lines failed inside a batch", function()
  it("runs the retryable ones (500 with error null) again and merges the second round's answers", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    modes(emu, { line_errors = { status = 500, every = 3 } })
    local c = client(emu)
    local dir = H.tmpdir()
    local resubmitted = 0
    local report = assert(pipeline.run(opts{ client = c, dir = dir, requests = requests(30, 10), resubmit = true,
      on_step = function(step)
        if step == "after_create" then
          resubmitted = resubmitted + 1
          if resubmitted == 1 then modes(emu, { line_errors = false }) end   -- the next round passes
        end
      end }))
    assert.are.same({ 30, 30 }, { count_ok(report) })
    assert.are.equal(2, #report.shards)
    assert.are.equal(10, report.shards[2].lines)              -- lines 1, 4, 7, ...: the failed ones only
    c:close()
    emu.stop()
  end)

  it("does not run the permanent ones again", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    local c = client(emu)
    local reqs = requests(10, 10)
    reqs[3].body.messages[1].content = "lbatch-emulator:fail " .. reqs[3].body.messages[1].content
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = reqs, resubmit = true }))
    assert.are.same({ 10, 9 }, { count_ok(report) })
    assert.are.equal(1, #report.shards)
    c:close()
    emu.stop()
  end)
end)

describe("pipeline after a refused step", function()
  it("a rerun sends an upload the service refused (4xx) at once: no wait for what was never made", function()
    local emu = H.emulator({ speed = 500, rate_limits = false, dialect = "openai" })
    modes(emu, { arrears = { after = 1 } })
    local c = client(emu, { region = "openai" })
    local o = opts{ client = c, dir = H.tmpdir(), requests = requests(100, 10), max_lines = 20, max_in_flight = 1,
                    recover_window = 30 }
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.are.equal("insufficient_quota", err.code)       -- the second upload refused
    modes(emu, { arrears = false })
    local looked = routes(emu)["GET /files"] or 0
    report = assert(pipeline.run(o))
    -- not looked for (a look lists the files, every 2 s of the 30 s window): sent again at once
    assert.are.equal(looked, routes(emu)["GET /files"] or 0)
    assert.are.same({ 100, 100 }, { count_ok(report) })
    local r = routes(emu)
    assert.are.same({ 6, 5 }, { r["POST /files"], r["POST /batches"] })
    c:close()
    emu.stop()
  end)
end)
