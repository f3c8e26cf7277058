-- The watcher: one budget of status calls per client shared by every
-- wait, list pages instead of one retrieve each, against the emulator with
-- its rate limits on. The emulator says when each batch ended (its wall
-- clock), which status calls it answered, and which it refused with 429.
local H = require "helper"
local lbatch = require "lbatch"
local now = require("lbatch.core").now

local function stats(emu)
  return (select(2, H.json("GET", emu.url .. "/_emulator/stats?finished=1")))
end

local function status_calls(st)
  local r = st.routes or {}
  return (r["GET /batches"] or 0) + (r["GET /batches/{id}"] or 0), r
end

-- n one-line batches, made quickly
local function make(c, dir, n, lines)
  local path = H.requests(dir .. "/w.jsonl", lines or 1, { url = "/v1/chat/completions", model = "qwen-plus" })
  local f = assert(c:upload(path))
  local ids = {}
  for i = 1, n do ids[i] = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id end
  return ids
end

describe("the watcher's budget", function()
  -- a watcher with one job watched and a loop that must not be slept on:
  -- the status calls it takes before it would sleep are the ones it has
  local watch = require "lbatch.impl.api.watch"
  local function at_once(w)
    local n = 0
    while pcall(w.take, w) do n = n + 1 assert(n < 10000) end
    return n
  end
  local function watcher(per_minute)
    local w = watch.new({ per_minute = per_minute, retrieve = function() end, list = function() end,
      loop = { sleep = function() error("out of calls") end } })
    w.jobs[{ id = "batch_x" }], w.count = true, 1
    return w
  end

  it("spends at most its burst (a tenth of a minute's calls) at once, at the start and after an idle while", function()
    local w = watcher(600)
    local first = at_once(w)
    assert.is_true(first >= 60 and first <= 61, first .. " calls at once")
    w.at = w.at - 3600                         -- an hour without a call: still no more than the burst
    local later = at_once(w)
    assert.is_true(later >= 60 and later <= 61, later .. " calls at once after an hour")
    assert.are.equal(first + later, w.calls)
    -- then its rate: 540 a minute beside the burst, 9 a second
    w.at = w.at - 5
    local five = at_once(w)
    assert.is_true(five >= 45 and five <= 46, five .. " calls after 5 s")
  end)
end)

describe("the watcher", function()
  it("watches 120 batches with list pages inside its budget: no 429, each end seen within a poll interval", function()
    local emu = H.emulator({ speed = 20, rate_limits = true })
    local budget, interval = 60, 3      -- two pages a round every 3 s: 40 a minute
    local c = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = budget })
    local dir = H.tmpdir()
    local ids = make(c, dir, 120, 3)
    local before = status_calls(stats(emu))
    local t0 = now()
    local seen_at, tasks = {}, {}
    for i, id in ipairs(ids) do
      tasks[i] = c:spawn(function()
        local b = assert(c:wait(id, { interval = interval, factor = 1, jitter = 0 }))
        seen_at[id] = now()
        return b.status
      end)
    end
    for _, t in ipairs(tasks) do assert.are.equal("completed", (assert(t:join()))) end
    local elapsed = now() - t0
    local st = stats(emu)
    local calls, routes = status_calls(st)
    calls = calls - before
    local t_emu, t_here = st.now, now()
    -- within the budget: what a bucket of `budget` a minute (burst included) allows
    assert.is_true(calls <= budget * elapsed / 60 + budget / 10 + 1,
      ("%d status calls in %.1f s over a budget of %d a minute"):format(calls, elapsed, budget))
    assert.is_true(calls < #ids / 4, ("%d status calls for %d batches"):format(calls, #ids))
    assert.are.equal(c:watcher().calls, calls)
    assert.is_nil(routes["429 GET /batches"])
    assert.is_nil(routes["429 GET /batches/{id}"])
    assert.is_truthy((routes["GET /batches"] or 0) > 0)
    for _, id in ipairs(ids) do
      local ended = st.finished[id]
      local seen = t_emu - (t_here - seen_at[id])   -- on the emulator's clock
      assert.is_true(seen - ended <= interval + 1,
        ("%s ended at %.2f, seen %.2f s later"):format(id, ended, seen - ended))
    end
    c:close()
    emu.stop()
  end)

  it("a few waits use retrieve, one each per poll", function()
    local emu = H.emulator({ speed = 200, rate_limits = true })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local ids = make(c, H.tmpdir(), 2)
    local a = c:spawn(function() return assert(c:wait(ids[1], { interval = 0.05 })).status end)
    local b = c:spawn(function() return assert(c:wait(ids[2], { interval = 0.05 })).status end)
    assert.are.equal("completed", (a:join()))
    assert.are.equal("completed", (b:join()))
    local _, routes = status_calls(stats(emu))
    assert.is_nil(routes["GET /batches"])
    assert.is_truthy(routes["GET /batches/{id}"] >= 2)
    c:close()
    emu.stop()
  end)

  it("a wait whose budget is spent still ends at its deadline", function()
    local emu = H.emulator({ speed = 0.01, rate_limits = true })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 2 })  -- a call every 60 s
    local ids = make(c, H.tmpdir(), 3)
    local t0 = now()
    local errs = {}
    local tasks = {}
    for i, id in ipairs(ids) do
      tasks[i] = c:spawn(function() return c:wait(id, { interval = 0.1, deadline = 1.5 }) end)
    end
    for i, t in ipairs(tasks) do
      local v, err = t:join()
      assert.is_nil(v)
      errs[i] = err
    end
    assert.is_true(now() - t0 < 4, "the waits ended " .. (now() - t0) .. " s later")
    for _, err in ipairs(errs) do
      assert.are.equal("timeout", err.kind)
      assert.are.equal("wait_deadline", err.code)
    end
    assert.is_true(c:watcher().calls <= 2)
    c:close()
    emu.stop()
  end)

  it("an on_progress that raises ends that wait with its error, and not the others", function()
    local emu = H.emulator({ speed = 200, rate_limits = false })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local ids = make(c, H.tmpdir(), 4)
    local tasks = {}
    for i, id in ipairs(ids) do
      tasks[i] = c:spawn(function()
        return c:wait(id, { interval = 0.05, on_progress = function()
          if i == 1 then error("my callback broke") end
        end })
      end)
    end
    local v, err = tasks[1]:join()
    assert.is_nil(v)
    assert.matches("my callback broke", tostring(err))
    for i = 2, 4 do assert.are.equal("completed", (assert(tasks[i]:join())).status) end
    c:close()
    emu.stop()
  end)

  it("checks its options", function()
    assert.has_error(function() lbatch.new({ api_key = "k", poll_budget = 0 }) end)
    assert.has_error(function() lbatch.new({ api_key = "k", limits = "fast" }) end)
    local c = lbatch.new({ api_key = "k", limits = "dashscope-strict" })
    assert.are.equal(100, c.config.poll_budget)
    assert.are.equal(1000, lbatch.new({ api_key = "k", region = "openai" }).config.poll_budget)
  end)
end)
