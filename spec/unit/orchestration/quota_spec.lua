-- lbatch.quota with no server: admission per model against configured
-- and learned limits, the request limit for embeddings only, and what
-- counts as a quota's refusal.
local quota = require "lbatch.impl.orchestration.quota"

describe("lbatch.impl.orchestration.quota", function()
  it("admits while the model's work in flight leaves room, one limit for all models or one each", function()
    local q = quota.new({ tokens = 500 })
    assert.is_true(q:fits("m", 300, 1))
    q:admit("m", 300, 1)
    assert.is_true(q:fits("m", 200, 1))              -- exactly at the limit
    assert.is_false(q:fits("m", 201, 1))             -- one over
    assert.is_true(q:fits("other", 400, 1))          -- per model
    q:release("m", 300, 1)
    assert.is_true(q:fits("m", 500, 1))
    local each = quota.new({ tokens = { a = 100 } })
    each:admit("a", 60, 1)
    assert.is_false(each:fits("a", 50, 1))
    each:admit("b", 10 ^ 9, 1)
    assert.is_true(each:fits("b", 10 ^ 9, 1))        -- no limit for b
  end)

  it("admits a shard larger than the limit when nothing of its model is in flight", function()
    local q = quota.new({ tokens = 100 })
    assert.is_true(q:fits("m", 1000, 1))
    q:admit("m", 1000, 1)
    assert.is_false(q:fits("m", 1, 1))
  end)

  it("learns a limit from the service's message, the lower one winning", function()
    local q = quota.new({ tokens = 5000000 })
    assert.is_true(q:limited("gpt"))                 -- one number: every model
    assert.is_false(quota.new():limited("gpt"))
    assert.is_true(q:learn("gpt", "Enqueued token limit reached for gpt-4o-mini in organization org-x. "
      .. "Limit: 2,000,000 enqueued tokens. Please try again once some in_progress batches have been completed."))
    assert.are.equal(2000000, (q:limits("gpt")))
    assert.is_true(q:learn("gpt", "Limit: 3,000,000 enqueued tokens."))
    assert.are.equal(2000000, (q:limits("gpt")))
    assert.is_true(q:learn("emb", "Enqueued request limit reached for text-embedding-3. Limit: 50,000 enqueued requests."))
    assert.are.same({ 5000000, 50000 }, { q:limits("emb") })
    local qr = quota.new({ requests = 40000 })          -- configured and learned: the lower holds
    assert.is_true(qr:learn("emb", "Limit: 50,000 enqueued requests."))
    assert.are.same({ nil, 40000 }, { qr:limits("emb") })
    assert.is_true(qr:learn("emb", "Limit: 30,000 enqueued requests."))
    assert.are.same({ nil, 30000 }, { qr:limits("emb") })
    assert.is_false(q:learn("gpt", "Rate limit reached"))
    assert.is_false(q:learn("gpt", nil))
  end)

  it("counts requests against the request limit for embeddings only", function()
    local q = quota.new({ requests = 100 })
    q:admit("e", 0, 80, true)
    assert.is_false(q:fits("e", 0, 30, true))
    assert.is_true(q:fits("e", 0, 20, true))
    q:admit("c", 0, 80, false)
    assert.is_true(q:fits("c", 0, 30, false))
  end)

  it("counts the batches of a model that ended", function()
    local q = quota.new()
    q:admit("m", 1, 1)
    assert.are.equal(0, q:ended("m"))
    q:release("m", 1, 1)
    assert.are.equal(1, q:ended("m"))
    assert.are.equal(0, q:model("m").jobs)
    q:release("m", 1, 1)                            -- never below nothing
    assert.are.equal(0, q:model("m").tokens)
  end)

  it("tells a quota's refusal from other failures", function()
    for _, code in ipairs({ "token_limit_exceeded", "too_many_running_batches", "too_many_tasks" }) do
      assert.is_true(quota.refused(code), code)
    end
    for _, code in ipairs({ "invalid_request_error", "rate_limit_exceeded", "Arrearage" }) do
      assert.is_false(quota.refused(code), code)
    end
    assert.is_false(quota.refused(nil))
  end)
end)
