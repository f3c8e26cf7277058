-- A canary run's report opened again by hand (pipeline.run's report:
-- groups and placed) gives the records in the input's order, as
-- report.results does; inputs/outputs/errors join the same answers with
-- the canary's first (documented). On the emulator over real HTTP.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local results = require "lbatch.results"

local N = 40

describe("a canary run's report opened again", function()
  local emu
  setup(function() emu = H.emulator({ speed = 400, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  local function ids_of(reader)
    local t = {}
    for rec in reader:each() do t[#t + 1] = rec.custom_id end
    return t
  end

  it("with groups and placed, in the input's order; with inputs, the canary's answers first", function()
    local dir = H.tmpdir()
    local requests = H.requests(dir .. "/in.jsonl", N, { line = function(i)
      return { custom_id = "r-" .. i, method = "POST", url = "/v1/chat/completions",
               body = { model = "qwen-plus", max_tokens = 20, messages = { { role = "user", content = "item " .. i } } } }
    end })
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local report = assert(pipeline.run({ client = c, dir = dir .. "/work", requests = requests, max_lines = 15,
      poll_interval = 0.05, max_poll_interval = 0.2, canary = { lines = 6 } }))
    assert.are.equal("passed", report.canary.state)
    local want = {}
    for i = 1, N do want[i] = "r-" .. i end
    assert.are.same(want, ids_of(report.results))
    local again = assert(results.open({ groups = report.groups, placed = report.placed }))
    assert.are.same(want, ids_of(again))
    -- the shards' files: every answer joined to its request, the canary's six first
    local flat = ids_of(assert(results.open({ inputs = report.inputs, outputs = report.outputs, errors = report.errors })))
    local sorted = {}
    for i, id in ipairs(flat) do sorted[i] = id end
    table.sort(sorted, function(a, b) return tonumber(a:sub(3)) < tonumber(b:sub(3)) end)
    assert.are.same(want, sorted)
    assert.are_not.same(want, flat)
    c:close()
  end)
end)
