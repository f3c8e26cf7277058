-- lbatch.cost: the one costing rule, and that estimate and results:summary use it.
local cost = require "lbatch.impl.formats.cost"
local jsonl = require "lbatch.jsonl"
local estimate = require "lbatch.impl.formats.estimate"

describe("cost.of", function()
  it("is (input * price.input + output * price.output) / 1e6 * discount", function()
    assert.are.equal((1200 * 0.8 + 300 * 2) / 1e6 * 0.5, cost.of(1200, 300, { input = 0.8, output = 2 }))
    assert.are.equal((1200 * 0.8 + 300 * 2) / 1e6, cost.of(1200, 300, { input = 0.8, output = 2 }, 1))
    assert.are.equal(0.5, cost.DISCOUNT)
  end)

  it("counts a missing price as 0", function()
    assert.are.equal(1000 * 0.8 / 1e6 * 0.5, cost.of(1000, 500, { input = 0.8 }))
    assert.are.equal(0, cost.of(1000, 500, {}))
    assert.are.equal(0, cost.of(0, 0, { input = 1, output = 1 }))
  end)

  it("serves jsonl.estimate (which is estimate.files)", function()
    assert.are.equal(estimate.files, jsonl.estimate)
    assert.are.equal(estimate.METHOD, jsonl.ESTIMATE_METHOD)
    local path = os.tmpname()
    local fh = assert(io.open(path, "wb"))
    fh:write('{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","max_tokens":100,'
      .. '"messages":[{"role":"user","content":"abcdefgh"}]}}\n')
    fh:close()
    local rep = assert(estimate.files(path, { prices = { m = { input = 1, output = 4 } } }))
    os.remove(path)
    local m = rep.models.m
    assert.are.same({ 2, 100 }, { m.input_tokens, m.output_tokens_max })
    assert.are.equal(cost.of(2, 0, { input = 1, output = 4 }), m.input_cost)
    assert.are.equal(cost.of(0, 100, { input = 1, output = 4 }), m.output_cost_max)
  end)
end)
