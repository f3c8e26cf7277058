-- lbatch.flow: asks and their rounds on the emulator, what an ask returns
-- for a failed line or a refused request, flow.all and ask.all, the
-- items' sources and keys, progress, max_cost, estimate, the hash.
local H = require "helper"
local lbatch = require "lbatch"
local flow = require "lbatch.flow"
local cjson = require "cjson"

local function items(n)
  local list = {}
  for i = 1, n do list[i] = { id = "i" .. i, text = "item " .. i } end
  return list
end

local function list_of(report)
  local out = {}
  for r in report.results:each() do out[#out + 1] = r end
  return out
end

describe("flow.hash", function()
  it("is the request's, whatever the order its fields were set in", function()
    local a, b = {}, {}
    a.model, a.prompt, a.temperature = "qwen-plus", "hi", 0.5
    b.temperature, b.prompt, b.model = 0.5, "hi", "qwen-plus"
    assert.are.equal(flow.hash(a), flow.hash(b))
    assert.are.equal(16, #flow.hash(a))
    b.prompt = "hi!"
    assert.are_not.equal(flow.hash(a), flow.hash(b))
    assert.are_not.equal(flow.hash({ messages = { { role = "user", content = "a" } } }),
                         flow.hash({ messages = { { role = "user", content = "b" } } }))
  end)

  it("is HMAC-SHA256 (key \"lbatch.flow\") of the canonical JSON, so that journals stay readable", function()
    -- the canonical form written out by hand, the digest made by openssl: a change to either
    -- would leave every ask a journal holds looking changed
    local req = { model = "qwen-plus", temperature = 0.5,
                  messages = { { role = "user", content = "hi" }, { role = "assistant", content = "yes" } } }
    local text = '{"messages":[{"content":"hi","role":"user"},{"content":"yes","role":"assistant"}],'
      .. '"model":"qwen-plus","temperature":0.5}'
    local d = H.tmpdir()
    H.write(d .. "/c", text)
    local out = H.sh("openssl dgst -sha256 -hmac lbatch.flow -r " .. H.q(d .. "/c"))
    assert.are.equal(out:match("^(%x+)"):sub(1, 16), flow.hash(req))
  end)
end)

describe("flow.run", function()
  local emu, client
  setup(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })
    client = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
  end)
  teardown(function() client:close() emu.stop() end)

  local function run(o)
    o.client, o.dir = client, o.dir or (H.tmpdir() .. "/work")
    o.poll_interval, o.max_poll_interval = 0.05, 0.2
    return flow.run(o)
  end

  it("answers each ask with the result record; the items come back in their order", function()
    local report = assert(run({ items = items(5), model = "qwen-plus", step = function(item, ask)
      local a = assert(ask{ prompt = item.text })
      local b = assert(ask{ prompt = "again: " .. a.content })
      return { a = a.content, b = b.content, tokens = b.usage.total_tokens, ok = b.ok }
    end }))
    assert.are.same({ 5, 5, 0, 10, 3 }, { report.items, report.done, report.failed, report.asks, #report.rounds })
    local rs = list_of(report)
    for i, r in ipairs(rs) do
      assert.are.equal("i" .. i, r.key)
      assert.are.equal("Emulated answer (qwen-plus): item " .. i, r.value.a)
      assert.are.equal("Emulated answer (qwen-plus): again: Emulated answer (qwen-plus): item " .. i, r.value.b)
      assert.is_true(r.value.ok and r.value.tokens > 0)
    end
    assert.is_true(report.tokens > 0)
  end)

  it("gives nil and the line's error for a failed line, and an item that raises fails alone", function()
    local report = assert(run({ items = items(4), model = "qwen-plus", step = function(item, ask)
      local prompt = item.id == "i2" and "lbatch-emulator:fail" or item.text
      local a, err = ask{ prompt = prompt }
      if item.id == "i3" then error("the step gave up on " .. item.id) end
      return a and a.content or ("failed: " .. err.code)
    end }))
    assert.are.same({ 3, 1 }, { report.done, report.failed })
    local rs = list_of(report)
    assert.are.equal("failed: emulated_failure", rs[2].value)
    assert.is_false(rs[3].ok)
    assert.matches("the step gave up on i3", rs[3].error)
    assert.matches("^Emulated answer", rs[4].value)
  end)

  it("answers a request the writer refuses at once, with nothing sent", function()
    local before = emu.stats().routes
    before = before ~= cjson.null and before["POST /batches"] or 0
    local report = assert(run({ items = items(2), step = function(item, ask)
      local a, err = ask{ prompt = item.text }                     -- no model
      return a or err.code
    end }))
    assert.are.same({ "missing_model", "missing_model" }, { list_of(report)[1].value, list_of(report)[2].value })
    assert.are.same({ 1, 0, 0 }, { #report.rounds, report.asks, report.batches })
    assert.are.equal(before, emu.stats().routes["POST /batches"] or 0)
  end)

  it("sends the asks of ask.all and of flow.all's branches in one round", function()
    local report = assert(run({ items = items(3), model = "qwen-plus", step = function(item, ask)
      local recs = ask.all{ { prompt = "a " .. item.id }, { prompt = "b " .. item.id } }
      local judged = flow.all{
        function() return assert(ask{ prompt = "j1 " .. recs[1].content }).content end,
        function()
          local x = assert(ask{ prompt = "j2 " .. recs[2].content })
          return assert(ask{ prompt = "j3 " .. x.content }).content
        end,
      }
      return judged
    end }))
    -- ask.all: round 1; both branches: round 2; the second branch's second ask: round 3
    assert.are.same({ 6, 6, 3, 0 }, { report.rounds[1].asks, report.rounds[2].asks, report.rounds[3].asks,
                                      report.rounds[4].asks })
    local r = list_of(report)[2]
    assert.are.equal("Emulated answer (qwen-plus): j1 Emulated answer (qwen-plus): a i2", r.value[1])
    assert.are.equal("Emulated answer (qwen-plus): j3 Emulated answer (qwen-plus): j2 "
      .. "Emulated answer (qwen-plus): b i2", r.value[2])
  end)

  it("takes embedding asks and raw bodies, each on its own endpoint's shard", function()
    local report = assert(run({ items = items(2), step = function(item, ask)
      local e = assert(ask{ model = "text-embedding-v3", input = item.text })
      local raw = assert(ask{ url = "/v1/chat/completions", body = { model = "qwen-plus",
        messages = { { role = "user", content = "raw " .. item.text } } } })
      return { dims = #e.embedding, content = raw.content }
    end }))
    local r = list_of(report)[2]
    assert.is_true(r.value.dims > 0)
    assert.are.equal("Emulated answer (qwen-plus): raw item 2", r.value.content)
    assert.are.same({ "/v1/embeddings" }, { report.rounds[1].files[1].endpoint })
    assert.are.same({ "/v1/chat/completions" }, { report.rounds[2].files[1].endpoint })
  end)

  it("reads items from a CSV (the first column the key) and from JSON lines", function()
    local dir = H.tmpdir()
    H.write(dir .. "/q.csv", "qid,question\nq1,What?\nq2,\"Why, then?\"\n")
    H.write(dir .. "/q.jsonl", '{"id":"j1","question":"Who?"}\n\n{"id":"j2","question":"When?"}\n')
    local function step(item, ask) return assert(ask{ model = "qwen-plus", prompt = item.question }).content end
    local a = list_of(assert(run({ items = dir .. "/q.csv", step = step })))
    assert.are.same({ "q1", "q2" }, { a[1].key, a[2].key })
    assert.are.equal("Emulated answer (qwen-plus): Why, then?", a[2].value)
    local b = list_of(assert(run({ items = dir .. "/q.jsonl", step = step })))
    assert.are.same({ "j1", "j2" }, { b[1].key, b[2].key })
    local _, err = run({ items = { { text = "no key" } }, step = step })
    assert.are.equal("no_key", err.code)
  end)

  it("reports progress: items done, asks pending by ask, rounds, tokens", function()
    local seen = {}
    assert(run({ items = items(3), model = "qwen-plus", on_progress = function(p)
      if not p.batches then seen[#seen + 1] = p end
    end, step = function(item, ask)
      local a = assert(ask{ prompt = item.text })
      if item.id ~= "i1" then assert(ask{ prompt = a.content }) end
      return true
    end }))
    assert.are.same({ 3, 0, 3, 1 }, { seen[1].items, seen[1].done, seen[1].pending["ask 1"], seen[1].round })
    assert.are.same({ 1, 2 }, { seen[2].done, seen[2].pending["ask 2"] })
    assert.are.same({ 3, 3 }, { seen[3].done, seen[3].rounds })
    assert.is_true(seen[3].tokens > seen[2].tokens and seen[2].tokens > 0)
  end)

  it("stops at max_cost before a round that may pass it, nothing of it sent", function()
    local prices = { ["qwen-plus"] = { input = 1000, output = 1000 } }
    local _, err = run({ items = items(3), model = "qwen-plus", max_cost = 0.01, prices = prices,
      step = function(item, ask) return assert(ask{ prompt = item.text, max_tokens = 100 }).content end })
    assert.are.equal("max_cost", err.code)
  end)

  it("refuses two items of one key, and keeps a value that is not JSON as the item's error", function()
    local function step(item, ask)
      assert(ask{ model = "qwen-plus", prompt = item.text })
      if item.id == "i2" then return function() end end
      return false
    end
    local _, err = run({ items = { { id = "a", text = "x" }, { id = "a", text = "y" } }, step = step })
    assert.are.equal("duplicate_key", err.code)
    assert.matches("two items have the key a", err.message)
    local rs = list_of(assert(run({ items = items(2), step = step })))
    assert.are.same({ true, false }, { rs[1].ok, rs[1].value })
    assert.is_false(rs[2].ok)
    assert.matches("not JSON", rs[2].error)
  end)

  -- odd items ask qwen-plus, even ones qwen-max, whose shard the emulator
  -- runs slowly (3 lines at 1,200 service seconds each: about 1.8 s here)
  local function two_speeds(seen)
    local core = require "lbatch.core"
    return {
      items = items(6), max_in_flight = 4,
      metadata = function(s) if s.model == "qwen-max" then return { emulator_line_seconds = "1200" } end end,
      step = function(item, ask)
        local model = tonumber(item.id:match("%d+")) % 2 == 0 and "qwen-max" or "qwen-plus"
        local a = assert(ask{ model = model, prompt = item.text })
        seen[item.id] = seen[item.id] or core.now()      -- when its first answer came into a pass
        local b = assert(ask{ model = "qwen-plus", prompt = "again: " .. a.content })
        return { a = a.content, b = b.content }
      end }
  end

  it("with flush, starts a pass for the shards back while a slow one is out; the values are the same", function()
    local seen, plain = {}, {}
    local report = assert(run(setmetatable({ flush = { lines = 100, seconds = 0.2 } },
                                           { __index = two_speeds(seen) })))
    assert.are.same({ 6, 6, 0, 12 }, { report.items, report.done, report.failed, report.asks })
    local fast, slow = 0, math.huge
    for id, t in pairs(seen) do
      if tonumber(id:match("%d+")) % 2 == 0 then slow = math.min(slow, t) else fast = math.max(fast, t) end
    end
    -- the fast items had their answers, and asked again, a second before the slow shard was back
    assert.is_true(slow - fast > 1, ("fast answered at %.2f, slow at %.2f"):format(fast, slow))
    -- passes: the first asks; the fast items' second asks alone, while the slow shard is out; then (in an
    -- order the shards' speeds decide) the slow items' second asks and the answers that end the items
    assert.are.same({ 6, 3 }, { report.rounds[1].asks, report.rounds[2].asks })
    assert.is_true(#report.rounds >= 4)
    -- without flush, a round waits for the slow shard: the fast items' answers come in with the slow ones
    local without = assert(run(two_speeds(plain)))
    local pf, ps = 0, math.huge
    for id, t in pairs(plain) do
      if tonumber(id:match("%d+")) % 2 == 0 then ps = math.min(ps, t) else pf = math.max(pf, t) end
    end
    assert.is_true(math.abs(ps - pf) < 0.5)
    assert.are.same({ 6, 6, 0 }, { without.rounds[1].asks, without.rounds[2].asks, without.rounds[3].asks })
    assert.are.same(list_of(without), list_of(report))
  end)

  it("with flush, a pass waits for flush.lines answers (or flush.seconds) while shards are out", function()
    local seen = {}
    -- 3 fast answers are fewer than 4 lines, and 30 s is not reached: the pass waits for the slow shard
    local report = assert(run(setmetatable({ flush = { lines = 4, seconds = 30 } },
                                           { __index = two_speeds(seen) })))
    assert.are.same({ 6, 6, 0 }, { report.rounds[1].asks, report.rounds[2].asks, report.rounds[3].asks })
    seen = {}
    report = assert(run(setmetatable({ flush = { lines = 3 } }, { __index = two_speeds(seen) })))
    assert.are.same({ 6, 3, 12 }, { report.rounds[1].asks, report.rounds[2].asks, report.asks })
  end)

  it("with flush, the shards' pipelines count one quota: a shard waits for another's work in flight", function()
    local overlapping = 0
    local report = assert(run({ items = items(6), model = "qwen-plus", max_lines = 2, flush = { lines = 1 },
      max_enqueued_tokens = 1, quota_poll = 0.02,        -- one shard of the model in flight at a time
      on_step = function(at, s)
        if at ~= "after_create" then return end
        local _, page = H.json("GET", emu.base .. "/batches?limit=100")
        for _, b in ipairs(page.data) do
          if b.input_file_id ~= s.file_id and not ({ completed = 1, failed = 1, expired = 1, cancelled = 1 })[b.status] then
            overlapping = overlapping + 1
          end
        end
      end,
      step = function(item, ask)
        local a = assert(ask{ prompt = item.text })
        return assert(ask{ prompt = "again: " .. a.content }).content
      end }))
    assert.are.same({ 6, 12, 3 }, { report.done, report.asks, #report.rounds[1].files })
    assert.are.equal(0, overlapping)
  end)

  -- the keys of each JSON line of a file (a set)
  local function keys_of(path)
    local ks = {}
    for line in io.lines(path) do
      for k in pairs(cjson.decode(line)) do ks[k] = true end
    end
    return ks
  end

  it("writes its dir in a named, versioned format, and refuses a newer version", function()
    for _, flush in ipairs({ false, true }) do
      local dir = H.tmpdir() .. "/work"
      local _, err = run({ dir = dir, items = items(4), model = "qwen-plus", flush = flush and { lines = 1 } or nil,
        on_progress = function(p) if p.round == 2 and not p.batches then error("stop") end end,
        step = function(item, ask)
          local a = assert(ask{ prompt = item.text })
          if item.id == "i1" then return a.content end
          return assert(ask{ prompt = "again: " .. a.content }).content
        end })
      assert.matches("stop", tostring(err))
      local st = cjson.decode(H.read(dir .. "/flow.json"))
      assert.are.same({ "lbatch-flow", 2 }, { st.format, st.version })
      assert.are.same({ index = true, key = true, item = true, answers = true, pending = true,
                        pending_hashes = true, pending_shards = flush or nil }, keys_of(dir .. "/round-2/state.jsonl"))
      assert.are.same({ index = true, key = true, ok = true, value = true }, keys_of(dir .. "/round-2/done.jsonl"))
      local entry = cjson.decode(io.lines(dir .. "/round-2/state.jsonl")())
      local answer = entry.answers["1"]
      assert.are.same({ hash = "string", record = "table" }, { hash = type(answer.hash), record = type(answer.record) })
      assert.are.equal(entry.key .. "#1", answer.record.custom_id)
      if flush then
        assert.are.same({ round = 2, shard = 1, status = "out" }, st.shards[1])
      end
      -- round 1's pipeline: its journal's header and run.json
      local pdir = dir .. (flush and "/round-1/batches-1" or "/round-1/batches")
      local head, id = cjson.decode(io.lines(pdir .. "/journal.jsonl")()), cjson.decode(H.read(pdir .. "/run.json"))
      assert.are.same({ "lbatch-pipeline", 2, "lbatch-run", 1 }, { head.format, head.version, id.format, id.version })
      st.version = 3
      H.write(dir .. "/flow.json", cjson.encode(st))
      local report
      report, err = run({ dir = dir, items = items(4), model = "qwen-plus", step = function() end })
      assert.is_nil(report)
      assert.are.equal("bad_state", err.code)
      assert.matches("flow.json is lbatch%-flow version 3; this lbatch reads lbatch%-flow versions 1 and 2", err.message)
    end
  end)

  it("raises when ask is called outside a step", function()
    assert.has_error(function() flow.all({ function() end }) end)
  end)
end)

describe("flow.estimate", function()
  it("estimates the first round and says what it cannot know", function()
    local est = assert(flow.estimate({ dir = H.tmpdir(), items = items(4), model = "qwen-plus",
      prices = { ["qwen-plus"] = { input = 0.8, output = 2 } },
      step = function(item, ask)
        if item.id == "i4" then return "nothing to ask" end
        local a = assert(ask{ prompt = item.text, max_tokens = 10 })
        return assert(ask{ prompt = a.content }).content
      end }))
    assert.are.same({ 4, 1, 3 }, { est.items, est.done, est.first.requests })
    assert.is_true(est.first.totals.input_cost > 0)
    assert.matches("only the first round is known", est.unknown)
  end)
end)
