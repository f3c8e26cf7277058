-- lbatch.pipeline with no server: what it refuses before any request (the
-- client points at a port nothing listens on, so a request would fail).
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local function offline() return assert(lbatch.new({ api_key = "k", base_url = "http://127.0.0.1:9", max_retries = 0 })) end
local function reqs(n)
  local t = {}
  for i = 1, n do t[i] = { custom_id = "r" .. i, body = { model = "qwen-plus", messages = { { role = "user", content = "q" } } } } end
  return t
end

describe("lbatch.pipeline before any request", function()
  it("refuses a run with no requests, or a request that is not a table", function()
    local _, err = pipeline.run({ client = offline(), dir = H.tmpdir(), requests = {} })
    assert.are.equal("invalid", err.kind)
    assert.matches("no requests", err.message)
    _, err = pipeline.run({ client = offline(), dir = H.tmpdir(), requests = { "x" } })
    assert.matches("must be a table", err.message)
  end)

  it("refuses a disk that cannot hold the run, before any upload", function()
    local _, err = pipeline.run({ client = offline(), dir = H.tmpdir(), requests = H.requests(H.tmpdir() .. "/r.jsonl", 10,
      { url = "/v1/chat/completions", model = "qwen-plus" }), disk_factor = 1e15 })
    assert.are.same({ "io", "disk_full" }, { err.kind, err.code })
  end)

  it("refuses max_cost without a price for the model", function()
    local _, err = pipeline.run({ client = offline(), dir = H.tmpdir(), requests = reqs(3), max_cost = 1,
                                  prices = { other = { input = 1, output = 1 } } })
    assert.are.equal("max_cost_unknown", err.code)
  end)

  it("adopts only a run id, and never over a journal", function()
    local _, err = pipeline.adopt({ client = offline(), dir = H.tmpdir(), run = "../x", requests = reqs(1) })
    assert.are.equal("invalid_run", err.code)
    local dir = H.tmpdir()
    H.write(dir .. "/journal.jsonl", "{}\n")
    _, err = pipeline.adopt({ client = offline(), dir = dir, run = "abc", requests = reqs(1) })
    assert.are.equal("journal_exists", err.code)
  end)

  it("raises on what is a programming error", function()
    assert.has_error(function() pipeline.run({ dir = "x", client = "c" }) end)
    assert.has_error(function() pipeline.run({ client = offline() }) end)
    -- a client, or what one is made from (provider, region, ...), not both
    assert.has_error(function() pipeline.run({ client = offline(), provider = "groq", dir = "x" }) end,
      "lbatch.pipeline.run: opts.client or opts.provider, not both")
    assert.has_error(function() pipeline.adopt({ client = offline(), region = "intl", dir = "x", run = "r" }) end,
      "lbatch.pipeline.adopt: opts.client or opts.region, not both")
  end)

  it("makes its client from a provider like a region, and refuses a provider it does not know", function()
    local _, err = pipeline.run({ provider = "groq", api_key = "k", base_url = "http://127.0.0.1:9", dir = H.tmpdir(),
                                  requests = {} })
    assert.matches("no requests", err.message)
    assert.has_error(function() pipeline.run({ provider = "nope", api_key = "k", dir = "x" }) end)
  end)
end)

-- A run knows what it was asked: what a run on a dir that holds a run does
-- before any request (the client points at nothing: a request would fail).
describe("lbatch.pipeline on a dir that holds a run", function()
  local function csv_of(path, rows)
    local t = { "id,content" }
    for _, r in ipairs(rows) do t[#t + 1] = r end
    H.write(path, table.concat(t, "\n") .. "\n")
    return path
  end

  -- a run that sharded and wrote its journal, then failed at its first upload
  local function started(dir, input, model)
    local _, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = model })
    assert.is_not_nil(err)
    assert.is_truthy(H.read(dir .. "/journal.jsonl"):find('"fp"', 1, true))
  end

  it("refuses another model with run_changed, naming both models and the flags, before any request", function()
    local dir, input = H.tmpdir(), csv_of(H.tmpdir() .. "/q.csv", { "a,one", "b,two" })
    started(dir, input, "qwen-plus")
    local before = H.read(dir .. "/journal.jsonl")
    local report, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-turbo" })
    assert.is_nil(report)
    assert.are.same({ "invalid", "run_changed" }, { err.kind, err.code })
    assert.matches("model was qwen%-plus, now qwen%-turbo", err.message)
    assert.matches("--fresh", err.message)
    assert.matches("--reuse", err.message)
    assert.matches("model was qwen%-plus, now qwen%-turbo", tostring(err))
    assert.are.equal(before, H.read(dir .. "/journal.jsonl"))         -- the run is left as it was
  end)

  it("names a changed system prompt, cut short, and a changed limit as what changed", function()
    local dir, input = H.tmpdir(), csv_of(H.tmpdir() .. "/q.csv", { "a,one" })
    local long = ("é"):rep(100)
    local _, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-plus", system = long })
    assert.is_not_nil(err)
    _, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-plus", system = "Be brief.",
                            limits = "openai" })
    assert.are.equal("run_changed", err.code)
    assert.matches("system was " .. ("é"):rep(28) .. "%.%.%., now Be brief%.", err.message)
    assert.matches("limits was dashscope, now openai", err.message)
  end)

  it("refuses a changed input while the run has not finished, and leaves no copy of it", function()
    local dir, input = H.tmpdir(), csv_of(H.tmpdir() .. "/q.csv", { "a,one", "b,two" })
    started(dir, input, "qwen-plus")
    csv_of(input, { "a,one", "b,two", "c,three" })
    local _, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-plus" })
    assert.are.same({ "invalid", "run_changed" }, { err.kind, err.code })
    assert.matches("has not finished", err.message)
    assert.are.equal("", H.sh("find " .. H.q(dir) .. " -mindepth 1 -type d"))
  end)

  it("resumes the same input and options as the same run (its journal's run id)", function()
    local dir, input = H.tmpdir(), csv_of(H.tmpdir() .. "/q.csv", { "a,one", "b,two" })
    started(dir, input, "qwen-plus")
    local run = H.read(dir .. "/journal.jsonl"):match('"run":"(%w+)"')
    local _, err = pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-plus" })
    assert.are_not.equal("run_changed", err.code)                      -- it went on to upload
    assert.are.equal(run, H.read(dir .. "/journal.jsonl"):match('"run":"(%w+)"'))
  end)

  it("takes the same requests written otherwise (keys in another order, spaces) as the same run", function()
    local dir, input = H.tmpdir(), H.tmpdir() .. "/in.jsonl"
    H.write(input, '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
      .. '"max_tokens":5,"messages":[{"role":"user","content":"q"}]}}\n')
    started(dir, input)
    local function header() return cjson.decode(H.read(dir .. "/journal.jsonl"):match("^[^\n]+")) end
    local before = header()
    H.write(input, '{ "body": {"messages": [{"content": "q", "role": "user"}], "max_tokens": 5.0, "model": "qwen-plus"},'
      .. ' "url": "/v1/chat/completions", "method": "POST", "custom_id": "a" }\n')
    local _, err = pipeline.run({ client = offline(), dir = dir, requests = input })
    assert.are_not.equal("run_changed", err.code)
    local after = header()
    assert.are.same({ before.run, before.fp.input }, { after.run, after.fp.input })
    assert.are_not.equal(before.fp.source, after.fp.source)      -- the file as it is now: no second look next time
    -- a request that changed is another input: not this run's (it has not finished)
    H.write(input, '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
      .. '"max_tokens":6,"messages":[{"role":"user","content":"q"}]}}\n')
    _, err = pipeline.run({ client = offline(), dir = dir, requests = input })
    assert.are.equal("run_changed", err.code)
  end)

  it("with on_change = \"fresh\", keeps the old journal beside the new run's", function()
    local dir, input = H.tmpdir(), csv_of(H.tmpdir() .. "/q.csv", { "a,one" })
    started(dir, input, "qwen-plus")
    local before = H.read(dir .. "/journal.jsonl")
    local run = before:match('"run":"(%w+)"')
    pipeline.run({ client = offline(), dir = dir, requests = input, model = "qwen-turbo", on_change = "fresh" })
    assert.are.equal(before, H.read(dir .. "/journal-" .. run .. ".jsonl"))
    local now_run = H.read(dir .. "/journal.jsonl"):match('"run":"(%w+)"')
    assert.are_not.equal(run, now_run)
    assert.is_true(H.exists(dir .. "/" .. now_run .. "/requests.jsonl"))   -- its files apart from the old run's
    assert.has_error(function() pipeline.run({ client = offline(), dir = dir, requests = input, on_change = "new" }) end)
  end)

  it("reads a journal of an older lbatch (no fingerprint) and says the check was not made", function()
    local dir = H.tmpdir()
    H.write(dir .. "/s1.jsonl", '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n')
    H.write(dir .. "/s1.output.jsonl", '{"custom_id":"a","response":{"status_code":200,"body":'
      .. '{"choices":[{"message":{"role":"assistant","content":"old"}}]}},"error":null}\n')
    H.write(dir .. "/journal.jsonl", '{"version":1,"run":"r0","phase":"done"}\n'
      .. '{"k":1,"shard":{"k":1,"path":"' .. dir .. '/s1.jsonl","name":"r0-1.jsonl","lines":1,"round":1,'
      .. '"step":"done","status":"completed","output":"' .. dir .. '/s1.output.jsonl"}}\n')
    local report = assert(pipeline.run({ client = offline(), dir = dir, requests = reqs(3), model = "qwen-max" }))
    assert.are.equal("unknown", report.change.fingerprint)
    local got = {}
    for rec in report.results:each() do got[#got + 1] = rec.custom_id .. "=" .. tostring(rec.content) end
    assert.are.same({ "a=old" }, got)
  end)
end)

-- A host's step() ends once its budget is spent, at the pipeline's pause()
-- points (issue 34): the work between two of them is what a frame may
-- have to carry. Driven with a budget of 0, every pause() ends the step;
-- the heap's growth per step (the collector stopped) measures that work,
-- the same on every Lua (LuaJIT's compiler is off meanwhile: its traces'
-- memory would count), and the setup (sharding, hashing, the journal's
-- writes, the run's identity, the disk's room) must come in pieces.
describe("lbatch.pipeline from a host's loop", function()
  it("spreads its setup over steps: no step before the first upload allocates a lump", function()
    local client, dir, requests = offline(), H.tmpdir(), reqs(200)
    local task = client:spawn(function()
      return pipeline.run({ client = client, dir = dir, requests = requests, max_lines = 2, max_in_flight = 100 })
    end)
    local steps, worst, at = 0, 0, 0
    if jit then jit.off() jit.flush() end
    collectgarbage("collect")
    collectgarbage("stop")
    -- until the first upload is in flight (it then fails: nothing listens)
    while not task:done() and client.scheduler.loop.ctl:pending() == 0 and steps < 100000 do
      local k0 = collectgarbage("count")
      client:step(0)
      local kb = collectgarbage("count") - k0
      steps = steps + 1
      if kb > worst then worst, at = kb, steps end
      collectgarbage("restart")
      collectgarbage("step", 0)
      collectgarbage("stop")
    end
    collectgarbage("restart")
    if jit then jit.on() end
    local sharded = H.exists(dir .. "/run.json")
    client:close()
    assert.is_true(sharded, "the run did not get past its setup")
    assert.is_true(steps > 100, "steps: " .. steps)
    -- (about 35 KB: the writer's manifest of the 100 shards; it was 61 KB
    -- when the journal's first compaction, the run's identity and the
    -- disk's room came in one step)
    assert.is_true(worst < 48, ("step %d of %d allocated %.0f KB"):format(at, steps, worst))
  end)
end)

-- On LuaJIT a trace holds to the functions it saw called: an iterator or a
-- closure made per file or per run had the code that calls it compiled
-- again and again, a few of those traces in a host's step (issue 34).
describe("lbatch.pipeline on LuaJIT", function()
  it("compiles its setup once: a third run compiles few new traces in pipeline.lua", function()
    if not jit then return end                 -- (nothing to compile on Lua 5.x)
    local client, requests, starts = offline(), reqs(200), 0
    local funcinfo = require("jit.util").funcinfo
    local function on_trace(what, _, func, pc)
      if what == "start" and (funcinfo(func, pc).source or ""):find("lbatch/pipeline.lua", 1, true) then
        starts = starts + 1
      end
    end
    for run = 1, 3 do
      if run == 3 then jit.attach(on_trace, "trace") end
      local _, err = pipeline.run({ client = client, dir = H.tmpdir(), requests = requests, max_lines = 2 })
      assert.is_truthy(err)                    -- (its first upload fails: nothing listens)
      if run == 3 then jit.attach(on_trace) end
    end
    client:close()
    -- (35 of them, one per shard file but the first few, when each file's
    -- lines were read with fh:lines())
    assert.is_true(starts < 20, ("%d traces started in pipeline.lua in the third run"):format(starts))
  end)
end)
