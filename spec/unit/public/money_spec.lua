-- The rules that decide money, each pinned at its boundary against the
-- emulator: the spending cap (max_cost) at its limit and across a
-- resubmitted round and a resume, the failure-ratio breaker
-- (max_failure_ratio) at its limit and on a shard whose every line fails,
-- and the fresh-id window's retries, counted apart from max_retries.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local function routes(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats")
  return s.routes ~= cjson.null and s.routes or {}
end

local function modes(emu, m)
  local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = m })
  assert.are.equal(200, status, cjson.encode(body))
end

-- n chat requests of 10 prompt tokens (lbatch's estimate and the
-- emulator's count alike) and max_tokens 10
local function requests(n)
  local list = {}
  for i = 1, n do
    local text = ("q%06d "):format(i)
    list[i] = { custom_id = "r" .. i, body = { model = "qwen-plus", max_tokens = 10,
      messages = { { role = "user", content = text .. ("x"):rep(40 - #text) } } } }
  end
  return list
end

-- at 1000 a million tokens and the batch discount (0.5), a request's bound
-- is 20 tokens x 1000 / 1e6 x 0.5 = 0.01: 100 requests, 1.0
local PRICES = { ["qwen-plus"] = { input = 1000, output = 1000 } }
local EPS = 1e-9

local function opts(t)
  local o = { poll_interval = 0.05, max_poll_interval = 0.1, quota_poll = 0.05, prices = PRICES }
  for k, v in pairs(t) do o[k] = v end
  return o
end

local function client(emu, o)
  o = o or {}
  o.api_key, o.base_url = "k", emu.base
  return assert(lbatch.new(o))
end

describe("the spending cap (max_cost)", function()
  local emu
  before_each(function() emu = H.emulator({ speed = 500, rate_limits = false }) end)
  after_each(function() emu.stop() end)

  it("runs a run whose bound is exactly the cap, and refuses one a hair over, before any upload", function()
    local c = client(emu)
    local _, err = pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(100), max_lines = 100,
      max_cost = 1.0 - EPS })
    assert.are.equal("max_cost", err and err.code)
    assert.is_nil(routes(emu)["POST /files"])
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(100),
      max_lines = 100, max_cost = 1.0 }))
    assert.are.equal(100, (report.results:summary()).ok)
    c:close()
  end)

  it("counts what the first round committed when a resubmitted round asks for more, and on resume", function()
    -- lines 1, 11, ..., 91 fail with a 500: a second round of 10 lines, bound 0.1
    modes(emu, { line_errors = { status = 500, every = 10 } })
    local c = client(emu)
    local dir = H.tmpdir()
    local o = opts{ client = c, dir = dir, requests = requests(100), max_lines = 100, resubmit = true,
                    max_rounds = 2, max_cost = 1.1 - EPS }
    local report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.are.equal("max_cost", err.code, tostring(err))
    assert.are.equal(1, routes(emu)["POST /batches"])              -- the second round was not created
    -- resumed with the same cap: still refused, nothing created
    report, err = pipeline.run(o)
    assert.is_nil(report)
    assert.are.equal("max_cost", err.code, tostring(err))
    assert.are.equal(1, routes(emu)["POST /batches"])
    -- resumed with room for both rounds: the second round runs, the first not again
    o.max_cost = 1.1 + EPS
    report = assert(pipeline.run(o))
    assert.are.equal(2, routes(emu)["POST /batches"])
    assert.are.equal(1, routes(emu)["POST /files"] - 1)            -- one upload a round
    assert.is_true((report.results:summary()).ok >= 90)
    c:close()
  end)
end)

describe("the spending cap and a quota", function()
  it("counts a shard once though the quota refused it and it was created again", function()
    local emu = H.emulator({ speed = 500, rate_limits = false })
    modes(emu, { token_limit = { tokens = 700 } })                 -- 6 shards of 200 tokens: 3 fit at once
    local c = client(emu)
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(120),
      max_lines = 20, max_in_flight = 6, max_cost = 1.2 }))        -- the bound: 120 x 0.01
    assert.are.equal(120, (report.results:summary()).ok)
    assert.is_true(routes(emu)["POST /batches"] > 6, "no shard was refused")
    c:close()
    emu.stop()
  end)
end)

describe("the failure-ratio breaker (max_failure_ratio)", function()
  local emu
  before_each(function() emu = H.emulator({ speed = 500, rate_limits = false }) end)
  after_each(function() emu.stop() end)

  it("holds at exactly the ratio and trips above it", function()
    modes(emu, { line_errors = { status = 500, every = 2 } })       -- half the lines fail
    local c = client(emu)
    local report = assert(pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(20),
      max_lines = 10, max_in_flight = 1, max_failure_ratio = 0.5 }))
    assert.are.equal(10, (report.results:summary()).failed)
    local _, err = pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(20), max_lines = 10,
      max_in_flight = 1, max_failure_ratio = 0.5 - EPS })
    assert.are.equal("max_failure_ratio", err and err.code)
    assert.matches("5 of 10 lines failed", err.message, 1, true)
    c:close()
  end)

  it("counts every line of a shard that expired before any line ran", function()
    modes(emu, { hold = { status = "validating", seconds = 1e9 } })
    local c = client(emu)
    -- once the batch is created, a day and more passes on the service's clock: it expires, nothing run
    c:spawn(function()
      while not routes(emu)["POST /batches"] do c:sleep(0.05) end
      c:sleep(0.2)
      H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 90000 } })
    end)
    local report, err = pipeline.run(opts{ client = c, dir = H.tmpdir(), requests = requests(10),
      max_lines = 10, max_failure_ratio = 0.5 })
    assert.is_nil(report)
    assert.are.equal("max_failure_ratio", err and err.code, tostring(err))
    assert.matches("10 of 10 lines failed", err.message, 1, true)
    c:close()
  end)
end)

describe("the fresh-id window", function()
  it("asks again for an id it just made without spending max_retries on it", function()
    local emu = H.emulator({ speed = 1, rate_limits = false })
    -- for 1.5 s after the upload, create answers 404 for the new file
    modes(emu, { consistency_delay = { seconds = 1.5 } })
    local c = client(emu, { max_retries = 1, fresh_window = 30 })
    local f = assert(c:upload(H.requests(H.tmpdir() .. "/r.jsonl", 2)))
    -- once a few 404s have passed, one 500: the one retry max_retries allows
    c:spawn(function()
      c:sleep(0.6)
      H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/batches$",
        status = 500, times = 1 } })
    end)
    local b, err = c:create({ input_file_id = f.id, endpoint = "/v1/chat/ds-test" })
    assert.is_table(b, tostring(err))
    local _, st = H.json("GET", emu.url .. "/_emulator/stats")
    assert.is_true(st.routes["POST /batches"] >= 4, cjson.encode(st.routes))   -- 404s, the 500, the answer
    -- and past the window, "not there" is not asked again
    local c2 = client(emu, { max_retries = 3, fresh_window = 0 })
    local f2 = assert(c2:upload(H.requests(H.tmpdir() .. "/r2.jsonl", 2)))
    local _, err2 = c2:create({ input_file_id = f2.id, endpoint = "/v1/chat/ds-test" })
    assert.are.equal(404, err2 and err2.status)
    c:close()
    c2:close()
    emu.stop()
  end)
end)

-- (here, not in estimate_spec: that spec runs on plain Lua 5.1 too, which makes no client)
describe("the spending cap and answers it cannot bound", function()
  local IMG, VID, CHAT = "/v1/images/generations", "/v1/videos", "/v1/chat/completions"
  local function line(id, url, body)
    return cjson.encode({ custom_id = id, method = "POST", url = url, body = body }) .. "\n"
  end
  -- a client on a port nothing listens on: a request would fail with a network error
  local function offline() return assert(lbatch.new({ api_key = "k", base_url = "http://127.0.0.1:9", max_retries = 0,
                                                      provider = "openai" })) end

  it("makes max_cost refuse lines it cannot cost, before any request, instead of counting them free", function()
    local dir = H.tmpdir()
    local cases = {
      { IMG, { model = "gpt-image-1", prompt = "a red cube" }, "images are priced per image" },
      { VID, { model = "sora-2", prompt = "a cube rolling" }, "videos are priced per second" },
      { CHAT, { model = "gpt-image-1", messages = { { role = "user", content = "hi" } } }, "2 of 2 requests set no max_tokens" },
    }
    for i, c in ipairs(cases) do
      local req = H.write(("%s/cap%d.jsonl"):format(dir, i), line("a", c[1], c[2]) .. line("b", c[1], c[2]))
      local _, err = pipeline.run({ client = offline(), dir = H.tmpdir(), requests = req, max_cost = 1000,
        prices = { ["gpt-image-1"] = { input = 5, output = 40 }, ["sora-2"] = { input = 1, output = 1 } } })
      assert.are.equal("max_cost_unknown", err and err.code, tostring(err))
      assert.matches(c[3], err.message, 1, true)
    end
  end)
end)
