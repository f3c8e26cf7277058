-- Work dirs written by an older lbatch (spec/fixtures/old-format, made by
-- its make.lua before the on-disk formats had names and versions) resume
-- with today's code against a fresh emulator: the same answers as a run
-- from the start, and nothing sent again that the old run had sent.
-- The fixtures hold @DIR@ where the old run wrote its absolute paths
-- (flow.json's asks files, the pipelines' shards): each is copied to a
-- temp dir and @DIR@ replaced by that dir.
local H = require "helper"
local lbatch = require "lbatch"
local flow = require "lbatch.flow"
local pipeline = require "lbatch.pipeline"

local judge = dofile(H.root .. "/spec/fixtures/judge_flow.lua")

local function items(n)
  local list = {}
  for i = 1, n do
    list[i] = { id = ("q%05d"):format(i), question = ("Question %d: what is %d + %d?"):format(i, i, i) }
  end
  return list
end

-- the fixture `name` copied into a temp dir, its paths made that dir's
local function relocated(name)
  local tmp = H.tmpdir()
  assert(H.ok(("cp -r %s %s"):format(H.q(H.root .. "/spec/fixtures/old-format/" .. name), H.q(tmp .. "/" .. name))))
  assert(H.ok(("cd %s && grep -rl @DIR@ . | xargs sed -i 's|@DIR@|%s|g'"):format(H.q(tmp .. "/" .. name), tmp)))
  return tmp .. "/" .. name
end

local function values(report)
  local v, n = {}, 0
  for r in report.results:each() do
    n = n + 1
    assert.is_true(r.ok, tostring(r.error))
    v[r.key] = r.value
  end
  return v, n
end

local function routes(emu)
  local r = emu.stats().routes
  return type(r) == "table" and r or {}
end

describe("a work dir of an older lbatch", function()
  local emu
  before_each(function() emu = H.emulator({ speed = 2000, rate_limits = false }) end)
  after_each(function() emu.stop() end)

  it("a pipeline with a shard downloaded sends only the shards not uploaded", function()
    local dir = relocated("pipeline")
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local report = assert(pipeline.run({ client = c, dir = dir .. "/work", requests = dir .. "/requests.jsonl",
      max_lines = 10, max_in_flight = 1, poll_interval = 0.05, max_poll_interval = 0.2 }))
    local r = routes(emu)
    assert.are.same({ 2, 2 }, { r["POST /files"], r["POST /batches"] })   -- shards 2 and 3, once each
    local seen, n = {}, 0
    for rec in report.results:each() do
      n = n + 1
      assert.is_true(rec.ok)
      assert.is_nil(seen[rec.custom_id])
      seen[rec.custom_id] = true
    end
    assert.are.equal(30, n)
    for i = 1, 30 do assert.is_true(seen["req-" .. i]) end
    -- written back in this version's format
    local head = require("cjson").decode(io.lines(dir .. "/work/journal.jsonl")())
    assert.are.same({ "lbatch-pipeline", 2 }, { head.format, head.version })
    c:close()
  end)

  it("a pipeline's journal of a newer version is refused, nothing sent", function()
    local dir = relocated("pipeline")
    local text = H.read(dir .. "/work/journal.jsonl"):gsub('^{"version":1,', '{"format":"lbatch-pipeline","version":3,')
    H.write(dir .. "/work/journal.jsonl", text)
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local report, err = pipeline.run({ client = c, dir = dir .. "/work", requests = dir .. "/requests.jsonl",
      max_lines = 10, poll_interval = 0.05 })
    assert.is_nil(report)
    assert.are.equal("journal_newer", err.code)
    assert.matches("journal.jsonl is lbatch-pipeline version 3", err.message, 1, true)
    assert.is_nil(next(routes(emu)))
    c:close()
  end)

  for _, name in ipairs({ "flow", "flush" }) do
    it(("a %s stopped after round 2's pass sends round 2 and what follows, once"):format(name), function()
      local dir = relocated(name)
      local flush = name == "flush" and { lines = 1, seconds = 0 } or nil
      local c = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
      local report = assert(flow.run({ client = c, dir = dir, items = items(20), key = judge.key,
        step = judge.step, poll_interval = 0.05, flush = flush }))
      assert.are.same({ 20, 0 }, { report.done, report.failed })
      local asks_after_1 = 0
      for R = 2, #report.rounds do asks_after_1 = asks_after_1 + report.rounds[R].asks end
      local r = routes(emu)
      assert.are.equal(report.batches - 1, r["POST /batches"])      -- round 1's batch is not sent again
      assert.are.equal(r["POST /batches"], r["POST /files"])
      assert.is_true(asks_after_1 >= 20)
      local got = values(report)
      local fresh = assert(flow.run({ client = c, dir = H.tmpdir() .. "/fresh", items = items(20),
        key = judge.key, step = judge.step, poll_interval = 0.05, flush = flush }))
      assert.are.same((values(fresh)), got)
      assert.are.equal(asks_after_1 + 20, fresh.asks)
      c:close()
    end)
  end
end)
