-- lbatch.flow at scale on the emulator: a three-step flow (an answer, a
-- judge's score, a revision of the low scorers) over 10,000 items, against
-- the same steps asked item by item; killed with kill -9 at random moments
-- and resumed; a step changed between runs.
local H = require "helper"
local lbatch = require "lbatch"
local flow = require "lbatch.flow"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local cjson = require "cjson"

-- 10,000 items (shards of 4,000, 1,000 in the kill test) on Lua 5.4 and
-- LuaJIT; under AddressSanitizer, which looks at memory, not scale, 3,000
-- (shards of 1,200 and 300: as many rounds, shards and kill points): the
-- 10,000 there cost it a minute of CPU a run of the suite
local N, MAX_LINES, KILL_LINES = 10000, 4000, 1000
if H.asan then N, MAX_LINES, KILL_LINES = 3000, 1200, 300 end
local judge = dofile(H.root .. "/spec/fixtures/judge_flow.lua")
local driver = H.root .. "/spec/fixtures/flow_driver.lua"

local function items(n)
  local list = {}
  for i = 1, n do
    list[i] = { id = ("q%05d"):format(i), question = ("Question %d: what is %d + %d?"):format(i, i, i) }
  end
  return list
end

local function routes(emu)
  local s = emu.stats()
  return s.routes ~= cjson.null and s.routes or {}
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

local function values_of(dir)
  return values({ results = assert(flow.results(dir)) })
end

-- every line the emulator answered, over its completed batches: custom_id -> times
-- each custom_id's answers, over every batch the service holds; and the
-- batches made from each input file
local function answered(emu)
  local seen, after, from = {}, nil, {}
  repeat
    local _, page = H.json("GET", emu.base .. "/batches?limit=100" .. (after and ("&after=" .. after) or ""))
    for _, b in ipairs(page.data) do
      assert.are.equal("completed", b.status)
      from[b.input_file_id] = (from[b.input_file_id] or 0) + 1
      local _, text = H.http("GET", emu.base .. "/files/" .. b.output_file_id .. "/content")
      for id in text:gmatch('"custom_id":"([^"]+)"') do seen[id] = (seen[id] or 0) + 1 end
      after = b.id
    end
  until not page.has_more
  return seen, from
end

-- the files the service holds that were uploaded as input (purpose batch)
local function inputs(emu)
  local ids, after = {}, nil
  repeat
    local _, page = H.json("GET", emu.base .. "/files?limit=100" .. (after and ("&after=" .. after) or ""))
    for _, f in ipairs(page.data) do
      if f.purpose == "batch" then ids[#ids + 1] = f.id end
      after = f.id
    end
  until not page.has_more
  return ids
end

-- one ask as a batch of its own, through the client's calls
local function ask_alone(client, dir, req)
  local path = ("%s/%d.jsonl"):format(dir, math.random(1e9))
  local w = jsonl.writer({ path = path })
  assert(w:chat("one", req))
  assert(w:close())
  local f = assert(client:upload(path))
  local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
  b = assert(client:wait(b.id, { interval = 0.05, max_interval = 0.2 }))
  local out = assert(client:content(b.output_file_id, { path = path .. ".out" }))
  local rec = results.record(H.read(out):match("[^\n]+"))
  if rec.ok then return rec end
  return nil, rec.error_message
end

describe("a flow over 10,000 items", function()
  local emu, reference
  setup(function() emu = H.emulator({ speed = 2000, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  it("does every item, in rounds of batches, to the values of the same steps asked item by item", function()
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
    local dir = H.tmpdir()
    local report = assert(flow.run({ client = client, dir = dir .. "/work", items = items(N), key = judge.key,
      step = judge.step, max_lines = MAX_LINES, poll_interval = 0.05, max_poll_interval = 0.2 }))
    assert.are.same({ N, N, 0 }, { report.items, report.done, report.failed })
    local v, n = values(report)
    assert.are.equal(N, n)
    -- three rounds of asks (and the pass that finds nothing left to ask):
    -- each round's batches are its shards, MAX_LINES lines each at most
    assert.are.equal(4, #report.rounds)
    local low = 0
    for _, val in pairs(v) do if val.score < 6 then low = low + 1 end end
    assert.is_true(low > N / 10 and low < N * 9 / 10, "some items are revised, not all: " .. low)
    local want = { N, N, low, 0 }
    local batches = 0
    for r, round in ipairs(report.rounds) do
      assert.are.equal(want[r], round.asks)
      assert.are.equal(math.ceil(round.asks / MAX_LINES), #round.files)
      batches = batches + #round.files
    end
    assert.are.equal(2 * N + low, report.asks)
    local rt = routes(emu)
    assert.are.same({ batches, batches, batches }, { report.batches, rt["POST /files"], rt["POST /batches"] })
    -- the same steps for a sample of items, each ask a batch of its own
    local sample = items(N)
    local checked = 0
    for i = 1, N, 397 do
      client:spawn(function()
        local item = sample[i]
        local ask = setmetatable({}, { __call = function(_, req) return ask_alone(client, dir, req) end })
        assert.are.same(judge.step(item, ask), v[item.id])
        checked = checked + 1
      end)
    end
    assert(client:run())
    assert.are.equal(math.ceil(N / 397), checked)
    client:close()
    reference = v
  end)

  for _, flush in ipairs({ false, "2000,0.3" }) do
  it("killed with kill -9 at random moments (uploads and creates in flight among them), asks each request once"
     .. (flush and ", with flush = {lines = 2000, seconds = 0.3}" or ""), function()
    assert(reference, "the run above gives the values to compare")
    local fresh = H.emulator({ speed = 2000, rate_limits = false })
    local dir = H.tmpdir()
    local work = dir .. "/work"
    -- shards of 1,000 lines here: more uploads and creates to be killed in
    -- (the values do not depend on the shards)
    local env = ("LBATCH_ROOT=%s FLOW_MAX_LINES=%d FLOW_FLUSH=%s"):format(H.q(H.root), KILL_LINES, flush or "")
    local function go(extra, after)
      local cmd = ("%s %s %s %s %s %d %s > %s/run.log 2>&1 & p=$!; "):format(env, H.lua, driver, fresh.base, work,
        N, extra or "", dir)
      if after then cmd = cmd .. ("sleep %.2f; kill -9 $p 2>/dev/null; "):format(after) end
      return H.sh(cmd .. "wait $p; echo exit=$?")
    end
    -- kills at random moments (in a round's pass, while answers are
    -- written, while batches run) between kills at a pipeline's steps (the
    -- upload or the create made, its answer lost with the process)
    local killed, at_steps = 0, 0
    for _, at in ipairs({ "after_upload:1", "after_create:2", "before_upload:1", "after_create:1",
                          "after_upload:1" }) do
      if go(nil, 0.2 + 0.8 * math.random()):find("exit=137", 1, true) then killed = killed + 1 end
      if go(at):find("exit=137", 1, true) then at_steps = at_steps + 1 end
    end
    assert.is_true(at_steps >= 3 and killed >= 3 and at_steps + killed >= 6,
      ("killed %d times at a step and %d at random"):format(at_steps, killed))
    assert.matches("exit=0", go())
    local done = H.read(dir .. "/run.log")
    local items_n, done_n, failed_n, asks = done:match("done (%d+) (%d+) (%d+) (%d+)")
    assert.are.same({ N, N, 0 }, { tonumber(items_n), tonumber(done_n), tonumber(failed_n) })
    -- every ask answered once by the service, and nothing more
    local seen, from = answered(fresh)
    local lines = 0
    for id, times in pairs(seen) do
      lines = lines + 1
      if times ~= 1 then error(id .. " was answered " .. times .. " times") end
    end
    assert.are.equal(tonumber(asks), lines)
    -- never uploaded twice, never a second batch of a file: each input file
    -- the service holds has one batch. (Counted from what the service holds,
    -- not from the requests it saw: a request cut by a kill -9 before its
    -- body was read is seen, and makes nothing.)
    local files = inputs(fresh)
    for _, id in ipairs(files) do assert.are.equal(1, from[id], id .. "'s batches") end
    local batches = 0
    for _, n in pairs(from) do batches = batches + n end
    assert.are.equal(#files, batches)
    local v = values_of(work)
    assert.are.same(reference, v)
    if flush then       -- the shards went on at their own pace: more passes than the three rounds
      assert.is_true(tonumber(done:match("done %d+ %d+ %d+ %d+ %d+ (%d+)")) > 4)
    end
    fresh.stop()
  end)
  end
end)

describe("a flow whose step changed between runs", function()
  local emu
  setup(function() emu = H.emulator({ speed = 2000, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  local function changed(item, ask)                 -- the judge asked with other words
    local a = assert(ask{ model = "qwen-plus", prompt = item.question })
    local j = assert(ask{ model = "qwen-max", prompt = "Rate this answer:\n" .. a.content })
    return { answer = a.content, score = judge.score(j.content) }
  end

  local function stopped_after_round_2(c, dir)
    local _, err = flow.run({ client = c, dir = dir, items = items(20), key = judge.key, step = judge.step,
      poll_interval = 0.05, on_progress = function(p) if p.round == 2 and not p.batches then error("stop") end end })
    assert.matches("stop", tostring(err))
  end

  it("is an error naming the item and the ask, and ask_again asks the changed requests again", function()
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
    local dir = H.tmpdir()
    stopped_after_round_2(c, dir .. "/a")
    local report, err = flow.run({ client = c, dir = dir .. "/a", items = items(20), key = judge.key,
                                   step = changed, poll_interval = 0.05 })
    assert.is_nil(report)
    assert.are.equal("flow_changed", err.code)
    assert.matches("item q00001: ask 2 is not the request journaled", err.message)
    report = assert(flow.run({ client = c, dir = dir .. "/a", items = items(20), key = judge.key, step = changed,
                               on_change = "ask_again", poll_interval = 0.05 }))
    assert.are.equal(20, report.done)
    assert.are.same({ 20, 20, 20, 0 }, { report.rounds[1].asks, report.rounds[2].asks, report.rounds[3].asks,
                                         report.rounds[4].asks })
    -- the same values as the changed step run from the start
    local fresh = assert(flow.run({ client = c, dir = dir .. "/b", items = items(20), key = judge.key,
                                    step = changed, poll_interval = 0.05 }))
    assert.are.same((values(fresh)), (values(report)))
    c:close()
  end)
end)
