-- lbatch.pipeline with no server: what it refuses before any request (the
-- client points at a port nothing listens on, so a request would fail).
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"

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
