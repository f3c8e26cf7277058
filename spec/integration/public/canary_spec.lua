-- Canary-gated runs (pipeline.run's canary, lbatch run --canary) on the
-- emulator over real HTTP: a sample spread over the input is run first and
-- its answers checked; the rest is sent only when enough of them pass. A
-- failed canary leaves the service holding the canary's file and batch and
-- nothing else; a passed one releases the rest, and every request is
-- answered once (the canary's answers are not asked again), through a
-- kill -9 during the canary too.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local N, CANARY, MAX_LINES = 100, 10, 30

-- N requests asking for a French translation, or (wrong) a German one
-- (language: a name, or fn(i) -> name)
local function input(dir, language)
  return H.requests(dir .. "/in.jsonl", N, { line = function(i)
    local lang = type(language) == "function" and language(i) or language or "French"
    return { custom_id = "req-" .. i, method = "POST", url = "/v1/chat/completions", body = { model = "qwen-plus",
      max_tokens = 50, messages = { { role = "user", content = ("Translate to %s: item %d"):format(lang, i) } } } }
  end })
end

-- the check: the emulator's answer echoes the prompt, so a French one says French
local function french(rec)
  return type(rec.content) == "string" and rec.content:find("French", 1, true) ~= nil, "no French in the answer"
end

-- the stride sample: lines floor(j * N / CANARY), j = 0 .. CANARY - 1
local function sample()
  local t = {}
  for j = 0, CANARY - 1 do t[#t + 1] = "req-" .. (math.floor(j * N / CANARY) + 1) end
  return t
end

local function sample_set()
  local t = {}
  for _, id in ipairs(sample()) do t[id] = true end
  return t
end

local function routes(emu)
  local r = emu.stats().routes
  return type(r) == "table" and r or {}
end

-- the custom_ids the emulator's batches ran (their output files' lines:
-- the service lets only those be read), with how many times each ran
local function sent(emu)
  local _, batches = H.json("GET", emu.base .. "/batches?limit=100")
  local seen, files = {}, 0
  for _, b in ipairs(batches.data) do
    files = files + 1
    assert.are.equal("completed", b.status)
    local _, text = H.http("GET", emu.base .. "/files/" .. b.output_file_id .. "/content")
    for line in tostring(text):gmatch("[^\n]+") do
      local id = cjson.decode(line).custom_id
      if id == nil then error("a line without custom_id: " .. line:sub(1, 300)) end
      seen[id] = (seen[id] or 0) + 1
    end
  end
  return seen, files
end

local function sorted_keys(t)
  local k = {}
  for id in pairs(t) do k[#k + 1] = id end
  table.sort(k)
  return k
end

local function run(emu, dir, requests, canary)
  local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
  local report, err = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
    poll_interval = 0.05, max_poll_interval = 0.2, canary = canary })
  return report, err, c
end

-- every request of the input answered, ok, once
local function all_answered(report)
  local seen, n = {}, 0
  for rec in report.results:each() do
    n = n + 1
    assert.is_true(rec.ok, tostring(rec.custom_id))
    assert.is_nil(seen[rec.custom_id], rec.custom_id)
    seen[rec.custom_id] = true
  end
  assert.are.equal(N, n)
  for i = 1, N do assert.is_true(seen["req-" .. i], "req-" .. i) end
end

describe("a canary", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function() emu.stop() end)

  it("that fails its check (a wrong prompt) stops the run: only the canary is uploaded and sent", function()
    local requests = input(dir, "German")
    local report, err, c = run(emu, dir, requests, { lines = CANARY, check = french })
    assert.is_nil(report)
    assert.are.same({ "canary", "canary_failed" }, { err.kind, err.code })
    assert.matches("0 of its 10 requests passed (0%), under min_ok 95%", err.message, 1, true)
    assert.matches("req-1: no French in the answer; req-11: no French", err.message, 1, true)
    assert.matches("the other 90 requests were not sent", err.message, 1, true)
    assert.are.same({ 10, 0, 90, "failed" }, { err.canary.requests, err.canary.passed, err.canary.rest,
                                              err.canary.state })
    -- the service holds the canary's file and batch, nothing more
    local r = routes(emu)
    assert.are.same({ 1, 1 }, { r["POST /files"], r["POST /batches"] })
    local _, files = H.json("GET", emu.base .. "/files?purpose=batch")
    assert.are.equal(1, #files.data)
    local ids, nbatches = sent(emu)
    assert.are.equal(1, nbatches)
    assert.are.same(sorted_keys(sample_set()), sorted_keys(ids))
    for _, id in ipairs(sample()) do assert.are.equal(1, ids[id]) end
    -- run again as it was: judged again, nothing sent
    report, err = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, canary = { lines = CANARY, check = french } })
    assert.is_nil(report)
    assert.are.equal("canary_failed", err.code)
    r = routes(emu)
    assert.are.same({ 1, 1 }, { r["POST /files"], r["POST /batches"] })
    -- a canary judged by a check cannot be resumed without it
    report, err = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES })
    assert.is_nil(report)
    assert.are.equal("canary_check_missing", err.code)
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    c:close()
  end)

  it("that passes releases the rest: every request answered once, the canary's answers kept", function()
    local requests = input(dir)
    local report, err, c = run(emu, dir, requests, { lines = CANARY, check = french })
    assert.is_table(report, tostring(err))
    assert.are.same({ "passed", 10, 10, 90 }, { report.canary.state, report.canary.requests, report.canary.passed,
                                               report.canary.rest })
    all_answered(report)
    local ids, nbatches = sent(emu)
    assert.are.equal(1 + math.ceil((N - CANARY) / MAX_LINES), nbatches)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
    -- a rerun after it passed runs nothing again
    local before = routes(emu)["POST /batches"]
    local again = assert(pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      canary = { lines = CANARY, check = french } }))
    assert.are.equal("passed", again.canary.state)
    assert.are.equal(before, routes(emu)["POST /batches"])
    c:close()
  end)

  it("gives its results in the input's order, as a run without a canary does", function()
    local requests = input(dir)
    local function ids_of(reader)
      local t = {}
      for rec in reader:each() do t[#t + 1] = rec.custom_id end
      return t
    end
    local plain, perr, c = run(emu, H.mkdir(dir .. "/plain"), requests)
    assert.is_table(plain, tostring(perr))
    local want = ids_of(plain.results)
    for i = 1, N do assert.are.equal("req-" .. i, want[i]) end
    -- 7 spread over 100 (shards of 30: the canary's lines fall in several of the rest's), and 45, in two shards of its own
    for _, lines in ipairs({ 7, 45 }) do
      local report, err = run(emu, H.mkdir(dir .. "/c" .. lines), requests, { lines = lines, check = french })
      assert.is_table(report, tostring(err))
      assert.are.equal(lines, report.canary.requests)
      assert.are.same(want, ids_of(report.results))
      assert.are.same({}, report.results:missing())
      -- a request with no answer is missing at its place too (its answers' file emptied)
      local last = report.shards[#report.shards]
      H.write(last.output, "")
      local rec_ids, missing = {}, {}
      for rec in report.results:each() do
        rec_ids[#rec_ids + 1] = rec.custom_id
        if rec.missing then missing[#missing + 1] = rec.custom_id end
      end
      assert.are.same(want, rec_ids)
      assert.are.same(missing, report.results:missing())
      assert.is_true(#missing > 0)
    end
    c:close()
  end)

  it("counts a check that raises, and a status that is not ok, as failures; passes at min_ok exactly", function()
    local requests = input(dir)
    local calls = 0
    local report, err, c = run(emu, dir, requests, { lines = CANARY, min_ok = 0.9, check = function(rec)
      calls = calls + 1
      if rec.custom_id == "req-41" then error("boom in the check") end
      return true
    end })
    assert.is_table(report, tostring(err))
    assert.are.same({ "passed", 9, 0.9 }, { report.canary.state, report.canary.passed, report.canary.min_ok })
    assert.are.equal(10, calls)
    assert.are.equal("req-41", report.canary.failures[1].custom_id)
    assert.matches("the check raised an error: .*boom in the check", report.canary.failures[1].why)
    all_answered(report)
    c:close()
    -- the same with min_ok 0.95 on another dir: stopped
    local c2 = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local v, err2 = pipeline.run({ client = c2, dir = dir .. "/work2", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, canary = { lines = CANARY, check = function(rec) return rec.custom_id ~= "req-41" end } })
    assert.is_nil(v)
    assert.matches("9 of its 10 requests passed (90%), under min_ok 95%", err2.message, 1, true)
    c2:close()
  end)

  it("gates a rerun's changed requests too; a run started without a canary cannot take one", function()
    local requests = input(dir)
    local report, err, c = run(emu, dir, requests, { lines = CANARY, check = french })
    assert.is_table(report, tostring(err))
    local before = routes(emu)["POST /files"]
    -- 20 requests changed, to a wrong prompt: the rerun's canary (4 of the 20) fails, the other 16 stay
    requests = input(dir, function(i) return i <= 20 and "German" or "French" end)
    local v, err2 = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, canary = { lines = 4, check = french } })
    assert.is_nil(v)
    assert.are.equal("canary_failed", err2.code)
    assert.are.same({ 4, 0, 16 }, { err2.canary.requests, err2.canary.passed, err2.canary.rest })
    assert.are.equal(before + 1, routes(emu)["POST /files"])
    -- a run stopped before it ended, started without a canary, is not given one
    local stopped = select(2, pipeline.run({ client = c, dir = dir .. "/plain", requests = requests,
      max_lines = MAX_LINES, on_step = function(step) if step == "after_upload" then error("stop here") end end }))
    assert.matches("stop here", tostring(stopped), 1, true)
    local uploads = routes(emu)["POST /files"]
    v, err2 = pipeline.run({ client = c, dir = dir .. "/plain", requests = requests, max_lines = MAX_LINES,
      canary = { lines = CANARY, check = french } })
    assert.is_nil(v)
    assert.are.equal("canary_late", err2.code)
    assert.are.equal(uploads, routes(emu)["POST /files"])
    c:close()
  end)

  it("refuses another canary.lines on a run whose canary is cut (canary_changed), takes another min_ok", function()
    local requests = input(dir, "German")
    local _, err, c = run(emu, dir, requests, { lines = CANARY, check = french })
    assert.are.equal("canary_failed", err.code)
    local function again(canary)
      return pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
        poll_interval = 0.05, max_poll_interval = 0.2, canary = canary })
    end
    for _, lines in ipairs({ CANARY + 2, CANARY - 1, 1 }) do
      local v, e = again({ lines = lines, check = french })
      assert.is_nil(v)
      assert.are.same({ "invalid", "canary_changed", "canary" }, { e.kind, e.code, e.param })
      assert.matches(("holds a run whose canary is 10 requests; %d were asked now"):format(lines), e.message, 1, true)
      assert.matches("give the same number (canary.lines = 10, --canary 10) or none", e.message, 1, true)
      assert.matches(("to have %d, start a new run (--fresh"):format(lines), e.message, 1, true)
    end
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    -- the same number, a lower bar: judged again (nothing sent again), passed, the rest released
    local v, e = again({ lines = CANARY, check = french, min_ok = 0 })
    assert.is_table(v, tostring(e))
    assert.are.same({ "passed", 0, 0 }, { v.canary.state, v.canary.passed, v.canary.min_ok })
    local ids = sent(emu)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
    -- done: another number is no longer refused (nothing to cut), nothing is sent
    local before = routes(emu)["POST /batches"]
    assert.is_table((again({ lines = CANARY + 2, check = french })))
    assert.are.equal(before, routes(emu)["POST /batches"])
    c:close()
  end)

  it("asked for more than the input holds: the same canary (all of it), not refused on resume", function()
    local requests = H.requests(dir .. "/five.jsonl", 5, { line = function(i)
      return { custom_id = "req-" .. i, method = "POST", url = "/v1/chat/completions", body = { model = "qwen-plus",
        max_tokens = 50, messages = { { role = "user", content = "Translate to German: item " .. i } } } }
    end })
    local _, err, c = run(emu, dir, requests, { lines = 10, check = french })
    assert.are.equal("canary_failed", err.code)
    assert.are.equal(5, err.canary.requests)
    local _, e2 = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      canary = { lines = 20, check = french } })
    assert.are.equal("canary_failed", e2.code)
    c:close()
  end)

  it("refuses a journal whose canary is of a newer version, sending nothing", function()
    local requests = input(dir, "German")
    local _, err, c = run(emu, dir, requests, { lines = CANARY, check = french })
    assert.are.equal("canary_failed", err.code)
    local path = dir .. "/work/journal.jsonl"
    local text = H.read(path)
    local head, rest = text:match("^([^\n]*)\n(.*)$")
    local h = cjson.decode(head)
    assert.are.same({ 1, "failed" }, { h.canary.version, h.canary.state })
    h.canary.version, h.canary.state = 2, "passed"
    H.write(path, cjson.encode(h) .. "\n" .. rest)
    local v, err2 = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      canary = { lines = CANARY, check = french } })
    assert.is_nil(v)
    assert.are.equal("journal_newer", err2.code)
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    c:close()
  end)

  it("is counted by max_cost: a run whose rest fits but not with the canary is refused", function()
    local requests = input(dir)
    local prices = H.write(dir .. "/prices.json", cjson.encode({ ["qwen-plus"] = { input = 1000, output = 1000 } }))
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    -- the bound of the whole run, with and without a canary, is the same: the canary is part of it
    local _, e1 = pipeline.run({ client = c, dir = dir .. "/a", requests = requests, max_lines = MAX_LINES,
      prices = prices, max_cost = 1e-9 })
    local _, e2 = pipeline.run({ client = c, dir = dir .. "/b", requests = requests, max_lines = MAX_LINES,
      prices = prices, max_cost = 1e-9, canary = { lines = CANARY } })
    assert.are.same({ "max_cost", "max_cost" }, { e1.code, e2.code })
    local bound = function(e) return tonumber(e.message:match("may cost up to ([%d%.e+-]+)")) end
    assert.is_true(bound(e1) > 0)
    assert.are.equal(bound(e1), bound(e2))
    assert.is_nil(routes(emu)["POST /files"])
    c:close()
  end)
end)

describe("adopt of a canary run", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function() emu.stop() end)

  -- a canary run stopped at `at` (an on_step), its journal lost: its id
  local function lost(c, requests, at)
    local _, err = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, max_poll_interval = 0.2, canary = { lines = CANARY, check = french },
      on_step = function(step, sh)
        if step .. ":" .. tostring(type(sh) == "table" and sh.k) == at then error("stop here") end
      end })
    assert.matches("stop here", tostring(err), 1, true)
    local id = cjson.decode(H.read(dir .. "/work/journal.jsonl"):match("^[^\n]*")).run
    os.remove(dir .. "/work/journal.jsonl")
    return id
  end

  local function adopt(c, requests, id, canary)
    return pipeline.adopt({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES, run = id,
      canary = canary })
  end

  it("after the canary passed: refused without its canary or with another, adopted with it; nothing sent twice", function()
    local requests = input(dir)
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local id = lost(c, requests, "after_upload:2")
    -- (the other shards go on while shard 2's step fails: some files and batches of the rest were made)
    local uploads, creates = routes(emu)["POST /files"], routes(emu)["POST /batches"]
    assert.is_true(uploads >= 2 and creates >= 1 and creates < uploads, uploads .. " " .. creates)
    -- without its canary: refused, naming it (the library, then the command)
    local found, err = adopt(c, requests, id)
    assert.is_nil(found)
    assert.are.same({ "invalid", "adopt_canary", "canary" }, { err.kind, err.code, err.param })
    assert.matches("was cut for a canary of 10 requests (its batches say so): adopt it with that canary", err.message, 1,
      true)
    assert.is_false(H.exists(dir .. "/work/journal.jsonl"))
    local code, out, cerr = H.lbatch(("adopt %s --run %s --dir %s --max-lines %d"):format(H.q(requests), id,
      H.q(dir .. "/work"), MAX_LINES), { emu = emu })
    assert.are.equal(1, code, out .. cerr)
    assert.matches("adopt it with that canary (--canary 10; and its check, --canary-check FILE.lua", cerr, 1, true)
    -- another size: refused
    found, err = adopt(c, requests, id, { lines = CANARY + 2 })
    assert.is_nil(found)
    assert.are.equal("adopt_mismatch", err.code)
    assert.is_false(H.exists(dir .. "/work/journal.jsonl"))
    -- its own, through the command: the canary had passed (the rest's first file is there)
    code, out, cerr = H.lbatch(("adopt %s --run %s --dir %s --max-lines %d --canary %d"):format(H.q(requests), id,
      H.q(dir .. "/work"), MAX_LINES, CANARY), { emu = emu })
    assert.are.equal(0, code, out .. cerr)
    assert.matches(("4 shard(s): %d file(s) and %d batch(es) found; its canary had passed; lbatch run resumes it")
      :format(uploads, creates), out, 1, true)
    -- the next run sends the rest, not the canary nor the uploaded file again
    local report, rerr = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, max_poll_interval = 0.2, canary = { lines = CANARY, check = french } })
    assert.is_table(report, tostring(rerr))
    assert.are.same({ "passed", true }, { report.canary.state, report.canary.adopted })
    all_answered(report)
    local ids = sent(emu)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
    assert.are.same({ 4, 4 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    local n = 0
    for rec in report.results:each() do n = n + 1 assert.are.equal("req-" .. n, rec.custom_id) end
    c:close()
  end)

  it("during the canary: adopted pending, judged by the next run (a wrong prompt stops it)", function()
    local requests = input(dir, "German")
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local id = lost(c, requests, "waiting:1")
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    local found, err = adopt(c, requests, id, { lines = CANARY, check = french })
    assert.is_table(found, tostring(err))
    assert.are.same({ 4, 1, 1, "pending" }, { found.shards, found.files, found.batches, found.canary })
    local report, rerr = pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = MAX_LINES,
      poll_interval = 0.05, max_poll_interval = 0.2, canary = { lines = CANARY, check = french } })
    assert.is_nil(report)
    assert.are.equal("canary_failed", rerr.code)
    assert.are.same({ 10, 0 }, { rerr.canary.requests, rerr.canary.passed })
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
    c:close()
  end)
end)

describe("lbatch run --canary", function()
  local emu, dir, check
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    dir = H.tmpdir()
    check = H.write(dir .. "/check.lua", [[
return function(rec)
  return type(rec.content) == "string" and rec.content:find("French", 1, true) ~= nil, "no French in the answer"
end
]])
  end)
  after_each(function() emu.stop() end)

  local function cmd(requests, more)
    return H.lbatch(("run %s --dir %s --max-lines %d --poll 0.05 --canary %d --canary-check %s %s"):format(
      H.q(requests), H.q(dir .. "/work"), MAX_LINES, CANARY, H.q(check), more or ""), { emu = emu })
  end

  it("exits 4 on a failed canary, says so in one line, and sends nothing past it", function()
    local code, out, err = cmd(input(dir, "German"))
    assert.are.equal(4, code, err)
    assert.matches("canary: 10 of 10 requests, 0 passed (0%), min 95%: stopped: 90 held, nothing more sent", err, 1,
      true)
    assert.matches("canary_failed", err, 1, true)
    assert.are.equal("", out)
    local ids, nbatches = sent(emu)
    assert.are.equal(1, nbatches)
    assert.are.same(sorted_keys(sample_set()), sorted_keys(ids))
    -- --json: the error with the canary's verdict
    code, out = cmd(dir .. "/in.jsonl", "--json")
    assert.are.equal(4, code)
    local v = cjson.decode(out)
    assert.are.same({ "canary", "canary_failed", "failed", 0, 10, 0 }, { v.error.kind, v.error.code,
      v.error.canary.state, v.error.canary.passed, v.error.canary.requests, v.error.canary.released })
    assert.are.equal("req-1", v.error.canary.failures[1].custom_id)
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
  end)

  it("exits 0 on a passed canary, says so in one line, and every request is answered once", function()
    local code, out, err = cmd(input(dir), "--json")
    assert.are.equal(0, code, err)
    assert.matches("canary: 10 of 10 requests, 10 passed (100%), min 95%: released 90", err, 1, true)
    local v = cjson.decode(out)
    assert.are.same({ N, N, "passed", 90 }, { v.total, v.ok, v.canary.state, v.canary.released })
    local ids = sent(emu)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
    local n = 0
    for line in io.lines(dir .. "/work/results.jsonl") do
      n = n + 1
      assert.is_not_nil(line:find("French", 1, true))
      assert.are.equal("req-" .. n, cjson.decode(line).custom_id)     -- in the input's order
    end
    assert.are.equal(N, n)
  end)

  it("exits 1 on another --canary N for a run whose canary is cut, naming the journal's", function()
    local code, _, err = cmd(input(dir, "German"))
    assert.are.equal(4, code, err)
    code, _, err = H.lbatch(("run %s --dir %s --max-lines %d --poll 0.05 --canary 12 --canary-check %s"):format(
      H.q(dir .. "/in.jsonl"), H.q(dir .. "/work"), MAX_LINES, H.q(check)), { emu = emu })
    assert.are.equal(1, code, err)
    assert.matches("\nlbatch run: invalid canary_changed: ", err, 1, true)
    assert.matches("canary is 10 requests; 12 were asked now", err, 1, true)
    assert.matches("(canary.lines = 10, --canary 10) or none", err, 1, true)
    assert.are.same({ 1, 1 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
  end)

  it("passes at --canary-min-ok: 9 of 10 at 0.9 releases the rest", function()
    local code, _, err = cmd(input(dir, function(i) return i == 41 and "German" or "French" end),
      "--canary-min-ok 0.9")
    assert.are.equal(0, code, err)
    assert.matches("canary: 10 of 10 requests, 9 passed (90%), min 90%: released 90", err, 1, true)
    local ids = sent(emu)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
  end)

  it("refuses --canary-check without --canary, and a check file that returns no function", function()
    local code, _, err = H.lbatch(("run %s --dir %s --canary-check %s"):format(H.q(input(dir)), H.q(dir .. "/w"),
      H.q(check)), { emu = emu })
    assert.are.equal(2, code)
    assert.matches("need --canary N", err, 1, true)
    H.write(check, "return 42\n")
    code, _, err = cmd(dir .. "/in.jsonl")
    assert.are.equal(2, code)
    assert.matches("must be a Lua file that returns a function: it returned a number", err, 1, true)
    assert.is_nil(routes(emu)["POST /files"])
  end)
end)

describe("a canary killed with kill -9", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function() emu.stop() end)

  it("resumes where it stopped, and no request is sent twice", function()
    local requests = input(dir)
    local driver = H.write(dir .. "/driver.lua", [[
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local base, work, requests, at = arg[1], arg[2], arg[3], arg[4]
local client = lbatch.new({ api_key = "k", base_url = base })
local function die(what)
  io.stdout:write("killing myself at ", what, "\n")
  io.stdout:flush()
  os.execute("kill -9 $PPID")
end
local report = assert(pipeline.run({ client = client, dir = work, requests = requests, max_lines = 30,
  max_in_flight = 1, poll_interval = 0.05, max_poll_interval = 0.2, recover_window = 8,
  canary = { lines = 10, check = function(rec) return (rec.content or ""):find("French", 1, true) ~= nil end },
  on_step = function(step, s)
    local k = type(s) == "table" and s.name and s.name:match("%-(%d+)%.jsonl$")
    if at == step .. ":" .. tostring(k) or at == step then die(at) end
  end }))
local n, ok = 0, 0
for rec in report.results:each() do n = n + 1 if rec.ok then ok = ok + 1 end end
print(("done %s %d %d"):format(report.canary.state, n, ok))
]])
    local work = dir .. "/work"
    -- the canary is shard 1: killed after its upload, while it waits, after its
    -- download, once judged, then the first shard of the rest after its upload
    for _, at in ipairs({ "after_upload:1", "waiting:1", "after_download:1", "canary", "after_upload:2" }) do
      local out = H.sh(("%s %s %s %s %s %s 2>&1; echo exit=$?"):format(H.lua, H.q(driver), emu.base, H.q(work),
        H.q(requests), at))
      assert.matches("killing myself at " .. at, out, 1, true)
      assert.matches("exit=137", out, 1, true)
    end
    local out = H.sh(("%s %s %s %s %s 2>&1"):format(H.lua, H.q(driver), emu.base, H.q(work), H.q(requests)))
    assert.matches("done passed 100 100", out, 1, true)
    local ids, nbatches = sent(emu)
    assert.are.equal(1 + math.ceil((N - CANARY) / MAX_LINES), nbatches)
    for i = 1, N do assert.are.equal(1, ids["req-" .. i], "req-" .. i) end
    local r = routes(emu)
    assert.are.same({ nbatches, nbatches }, { r["POST /files"], r["POST /batches"] })
  end)
end)
