-- lbatch.flow's finish_realtime on the emulator (its real-time chat and
-- embeddings endpoints, answered as its batch engine answers the same
-- body): a round of few asks goes through client:request, not a batch,
-- to the values of the same flow all in batches; at full price; an
-- answer journaled as it comes, so a run stopped midway asks only the
-- rest again.
local H = require "helper"
local jsonl = require "lbatch.jsonl"
local lbatch = require "lbatch"
local flow = require "lbatch.flow"
local cjson = require "cjson"

local function items(n)
  local list = {}
  for i = 1, n do list[i] = { id = "i" .. i, text = "item " .. i, n = i } end
  return list
end

local function values(report)
  local v = {}
  for r in report.results:each() do
    assert.is_true(r.ok, tostring(r.error))
    v[r.key] = r.value
  end
  return v
end

-- an answer for every item, then for every fourth a revision and an
-- embedding at once (one of them asking the emulator to fail)
local function step(item, ask)
  local a = assert(ask{ model = "qwen-plus", prompt = item.text })
  if item.n % 4 ~= 0 then return { a = a.content } end
  local prompt = "revise: " .. a.content
  if item.n == 8 then prompt = prompt .. " lbatch-emulator:fail" end
  local recs, errs = ask.all{ { model = "qwen-plus", prompt = prompt },
                              { model = "text-embedding-v3", input = a.content } }
  return { a = a.content, b = recs[1] and recs[1].content or errs[1].code, dims = #recs[2].embedding,
           first = recs[2].embedding[1] }
end

local function routes(emu)
  local s = emu.stats().routes
  return s ~= cjson.null and s or {}
end

local function delta(before, after, k) return (after[k] or 0) - (before[k] or 0) end

for _, dialect in ipairs({ "dashscope", "openai" }) do
  describe("finish_realtime (" .. dialect .. " dialect)", function()
    local emu, client
    setup(function()
      emu = H.emulator({ speed = 2000, rate_limits = false, dialect = dialect })
      client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    end)
    teardown(function() client:close() emu.stop() end)

    local function run(o)
      o.client, o.dir = o.client or client, o.dir or (H.tmpdir() .. "/work")
      o.poll_interval, o.max_poll_interval = 0.05, 0.2
      return flow.run(o)
    end

    it("sends the last round's few asks in real time, to the values of the run all in batches", function()
      local r0 = routes(emu)
      local batch = assert(run({ items = items(12), step = step }))
      local r1 = routes(emu)
      assert.are.equal(3, delta(r0, r1, "POST /batches"))        -- round 1; round 2's chat and embeddings
      assert.are.equal(0, delta(r0, r1, "POST /chat/completions"))
      local rt = assert(run({ items = items(12), step = step, finish_realtime = 6 }))
      local r2 = routes(emu)
      assert.are.equal(1, delta(r1, r2, "POST /batches"))         -- round 1 only
      assert.are.equal(1, delta(r1, r2, "POST /files"))
      assert.are.equal(3, delta(r1, r2, "POST /chat/completions"))
      assert.are.equal(3, delta(r1, r2, "POST /embeddings"))
      assert.are.same({ 12, 6, 0 }, { rt.rounds[1].asks, rt.rounds[2].asks, rt.rounds[3].asks })
      assert.are.same({ 1, 0, 6, 6 }, { rt.rounds[1].batches, rt.rounds[2].batches, rt.rounds[2].realtime,
                                        rt.realtime })
      assert.are.same({ 3, 1 }, { batch.batches, rt.batches })
      local v = values(rt)
      assert.are.same(values(batch), v)
      assert.are.equal("emulated_failure", v.i8.b)
      assert.are.equal("Emulated answer (qwen-plus): revise: Emulated answer (qwen-plus): item 4", v.i4.b)
      assert.are.equal(1024, v.i12.dims)
    end)

    it("costs the real-time asks at full price (twice the batch price)", function()
      local prices = { ["qwen-plus"] = { input = 2, output = 4 }, ["text-embedding-v3"] = { input = 1 } }
      local r0 = routes(emu)
      local batch = assert(run({ items = items(8), step = step, prices = prices }))
      local r1 = routes(emu)
      local rt = assert(run({ items = items(8), step = step, prices = prices, finish_realtime = 100 }))
      local r2 = routes(emu)
      assert.are.same({ 0, 0, 12 }, { delta(r1, r2, "POST /batches"), delta(r1, r2, "POST /files"), rt.realtime })
      assert.are.equal(8 + 2, delta(r1, r2, "POST /chat/completions"))
      assert.is_true(delta(r0, r1, "POST /batches") > 0)
      assert.are.equal(batch.tokens, rt.tokens)
      assert.is_true(batch.cost > 0)
      assert.is_true(math.abs(rt.cost - 2 * batch.cost) < 1e-12, rt.cost .. " vs " .. batch.cost)
      assert.are.same(values(batch), values(rt))
    end)

    it("bounds a real-time round by max_cost at full price", function()
      local prices = { ["qwen-plus"] = { input = 1000, output = 1000 } }
      local function once(item, ask) return assert(ask{ model = "qwen-plus", prompt = item.text, max_tokens = 100 })
        .content end
      -- 2 asks of at most ~206 tokens: about 0.103 at batch prices, 0.206 at full price
      assert(run({ items = items(2), step = once, prices = prices, max_cost = 0.15 }))
      local r0 = routes(emu)
      local _, err = run({ items = items(2), step = once, prices = prices, max_cost = 0.15, finish_realtime = 2 })
      assert.are.equal("max_cost", err.code)
      assert.matches("at full price", err.message)
      assert.are.equal(0, delta(r0, routes(emu), "POST /chat/completions"))
    end)

    it("sends a real-time round that may cost exactly what is left of max_cost", function()
      local prices = { ["qwen-plus"] = { input = 1000, output = 1000 } }
      local function once(item, ask) return assert(ask{ model = "qwen-plus", prompt = item.text, max_tokens = 100 })
        .content end
      local dir = H.tmpdir() .. "/work"
      -- refused under a tiny max_cost: the round's request files stay, and
      -- their bound at full price is the estimate's, to the last bit
      local _, err = run({ dir = dir, items = items(2), step = once, prices = prices, max_cost = 1e-9,
                           finish_realtime = 2 })
      assert.are.equal("max_cost", err.code)
      local paths = {}
      for path in H.sh("ls " .. H.q(dir) .. "/round-1/*.jsonl"):gmatch("[^\n]+") do
        if not path:find("realtime.jsonl", 1, true) and not path:find("state.jsonl", 1, true)
          and not path:find("done.jsonl", 1, true) then paths[#paths + 1] = path end
      end
      assert.is_true(#paths > 0, "the round's request files")
      local t = assert(jsonl.estimate(paths, { prices = prices, discount = 1 })).totals
      local bound = t.input_cost + (t.output_cost_max or 0)
      local r0 = routes(emu)
      local report = assert(run({ items = items(2), step = once, prices = prices, max_cost = bound, finish_realtime = 2 }))
      assert.are.equal(2, report.done)
      assert.are.equal(2, delta(r0, routes(emu), "POST /chat/completions"))
    end)

    it("refuses a real-time round whose answers have no bound (no max_tokens) under max_cost", function()
      local prices = { ["qwen-plus"] = { input = 1000, output = 1000 } }
      local function once(item, ask) return assert(ask{ model = "qwen-plus", prompt = item.text }).content end
      local r0 = routes(emu)
      -- a huge max_cost: the answers' cost is unknown, not free
      local _, err = run({ items = items(2), step = once, prices = prices, max_cost = 1e9, finish_realtime = 2 })
      assert.are.equal("max_cost", err.code)
      assert.matches("an unknown amount", err.message, 1, true)
      assert.matches("max_tokens", err.message, 1, true)
      assert.are.equal(0, delta(r0, routes(emu), "POST /chat/completions"))
    end)

    it("journals each answer as it comes: a request that failed is the only one asked again", function()
      local c = assert(lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 0 }))
      local dir = H.tmpdir() .. "/work"
      local simple = function(item, ask) return assert(ask{ model = "qwen-plus", prompt = item.text }).content end
      H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/v1/chat/completions$", method = "POST",
                                                                status = 503, times = 1 } })
      local r0 = routes(emu)
      local report, err = run({ client = c, dir = dir, items = items(5), step = simple, finish_realtime = 5 })
      assert.is_nil(report)
      assert.are.equal(503, err.status)
      local r1 = routes(emu)
      assert.are.equal(5, delta(r0, r1, "POST /chat/completions"))
      report = assert(run({ client = c, dir = dir, items = items(5), step = simple, finish_realtime = 5 }))
      local r2 = routes(emu)
      assert.are.equal(1, delta(r1, r2, "POST /chat/completions"))     -- the failed one, nothing else
      assert.are.equal(0, delta(r0, r2, "POST /batches"))
      -- the journal: its format's record first, then an answer a line, each once
      local lines = {}
      for line in io.lines(dir .. "/round-1/realtime.jsonl") do lines[#lines + 1] = cjson.decode(line) end
      assert.are.same({ format = "lbatch-realtime", version = 1 }, lines[1])
      assert.are.equal(6, #lines)
      assert.are.same(values(assert(run({ items = items(5), step = simple }))), values(report))
      c:close()
    end)
  end)
end

describe("finish_realtime killed with kill -9 in its real-time round", function()
  local emu
  setup(function() emu = H.emulator({ speed = 2000, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  it("resumes: every answer journaled is kept, only those in flight at the kill are asked again", function()
    local N, driver = 200, H.root .. "/spec/fixtures/flow_driver.lua"
    local dir = H.tmpdir()
    -- rounds 1 and 2 (N asks each) in batches, round 3 (the revisions) in real time
    local env = ("LBATCH_ROOT=%s FLOW_FINISH_REALTIME=%d"):format(H.q(H.root), N - 1)
    local function go(work, at)
      return H.sh(("%s %s %s %s %s %d %s > %s/run.log 2>&1; echo exit=$?"):format(env, H.lua, driver, emu.base,
        dir .. "/" .. work, N, at or "", dir))
    end
    local function log() return H.read(dir .. "/run.log") end
    local before = routes(emu)
    assert.matches("exit=0", go("reference"))
    local low = tonumber(log():match("done %d+ %d+ %d+ (%d+)")) - 2 * N
    local mid = routes(emu)
    assert.is_true(low > 10 and low < N - 1, "some revisions, fewer than N: " .. low)
    assert.are.equal(low, delta(before, mid, "POST /chat/completions"))
    assert.matches("exit=137", go("killed", "realtime:3"))
    assert.matches("exit=137", go("killed", "realtime:5"))
    assert.matches("exit=0", go("killed"))
    local after = routes(emu)
    local asked = delta(mid, after, "POST /chat/completions")
    -- each kill leaves at most the other 7 of the 8 at once unjournaled
    assert.is_true(asked >= low and asked <= low + 2 * 7, ("%d real-time requests for %d asks"):format(asked, low))
    assert.are.equal(delta(before, mid, "POST /batches"), delta(mid, after, "POST /batches"))
    assert.are.same(values({ results = assert(flow.results(dir .. "/reference")) }),
                    values({ results = assert(flow.results(dir .. "/killed")) }))
  end)
end)

describe("client:request", function()
  local emu, client
  setup(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    client = assert(lbatch.new({ api_key = "sk-secret-key-0123456789", base_url = emu.base, max_retries = 0 }))
  end)
  teardown(function() client:close() emu.stop() end)

  it("posts a line's body to the real-time endpoint of its url", function()
    local body = assert(client:request("/v1/chat/completions", { model = "qwen-plus",
      messages = { { role = "user", content = "hello" } } }))
    assert.are.equal("Emulated answer (qwen-plus): hello", body.choices[1].message.content)
    local e = assert(client:request("/v1/embeddings", { model = "text-embedding-v3", input = "hello" }))
    assert.are.equal(1024, #e.data[1].embedding)
  end)

  it("waits for a slow answer past stall_timeout (a model is silent until its answer is whole)", function()
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 0, stall_timeout = 0.3 }))
    H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/v1/chat/completions$", delay = 1 } })
    local v = assert(c:request("/v1/chat/completions", { model = "qwen-plus",
      messages = { { role = "user", content = "slow" } } }))
    assert.are.equal("Emulated answer (qwen-plus): slow", v.choices[1].message.content)
    c:close()
  end)

  it("gives nil and the service's error, without the key", function()
    local _, err = client:request("/v1/chat/completions", { model = "qwen-plus",
      messages = { { role = "user", content = "lbatch-emulator:fail" } } })
    assert.are.same({ 400, "emulated_failure" }, { err.status, err.code })
    local _, bad = client:request("../x", {})
    assert.are.equal("invalid_url", bad.code)
    assert.is_nil(tostring(err):find("sk-secret", 1, true))
  end)
end)
