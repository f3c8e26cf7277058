-- The batch object's usage and model (OpenAI fills them on batches created
-- since September 2025: openai npm 6.49.0 resources/batches.d.ts, Batch.usage
-- and Batch.model) against the sum of the result lines' usage: the
-- batch's wins, as what the service bills; the lines' sum is kept apart.
-- Pure: real result files, no server.
local H = require "helper"
local results = require "lbatch.results"
local report = require "lbatch.cmd.report"
local cjson = require "cjson"

local function chat_line(id, model, pt, ct)
  return cjson.encode({ id = "batch_req_" .. id, custom_id = id, error = cjson.null,
    response = { status_code = 200, request_id = "req_" .. id, body = {
      id = "chatcmpl-" .. id, object = "chat.completion", model = model,
      choices = { { index = 0, message = { role = "assistant", content = "answer " .. id }, finish_reason = "stop" } },
      usage = { prompt_tokens = pt, completion_tokens = ct, total_tokens = pt + ct,
                prompt_tokens_details = { cached_tokens = 1 } } } } })
end

local function batch(model, input, output, completed)
  return { id = "batch_" .. model, object = "batch", status = "completed", model = model,
           request_counts = { total = completed, completed = completed, failed = 0 },
           usage = { input_tokens = input, input_tokens_details = { cached_tokens = 40 },
                     output_tokens = output, output_tokens_details = { reasoning_tokens = 7 },
                     total_tokens = input + output } }
end

describe("summary with the batches' usage", function()
  local dir, out
  local prices = { ["gpt-5-mini"] = { input = 1, output = 2 } }
  setup(function()
    dir = H.tmpdir()
    -- three answered lines: 30 in, 12 out by their own usage
    out = H.write(dir .. "/out.jsonl", chat_line("a", "gpt-5-mini", 10, 4) .. "\n" .. chat_line("b", "gpt-5-mini", 10, 4)
      .. "\n" .. chat_line("c", "gpt-5-mini", 10, 4) .. "\n")
  end)

  it("the lines' sum without batches, or when one batch has no usage (a mix would miscount)", function()
    local s = assert(assert(results.open({ output = out })):summary({ prices = prices }))
    assert.are.same({ "lines", 30, 12, 42, 3 }, { s.usage_source, s.prompt_tokens, s.completion_tokens, s.total_tokens,
                                                 s.cached_tokens })
    assert.is_nil(s.lines_usage)
    local other = batch("gpt-5-mini", 1000, 500, 3)
    other.usage = nil
    s = assert(assert(results.open({ output = out })):summary({ batches = { batch("gpt-5-mini", 1000, 500, 3), other } }))
    assert.are.same({ "lines", 30, 12 }, { s.usage_source, s.prompt_tokens, s.completion_tokens })
  end)

  it("the batch's usage wins over a different sum of lines; the lines' sum is kept as lines_usage", function()
    -- the service billed 1000 in, 500 out; the result lines sum to 30 in, 12 out
    local s = assert(assert(results.open({ output = out }))
      :summary({ prices = prices, batches = { batch("gpt-5-mini", 1000, 500, 3) } }))
    assert.are.same({ "batch", true }, { s.usage_source, s.usage_differs })
    assert.are.same({ 1000, 500, 1500, 7, 40 }, { s.prompt_tokens, s.completion_tokens, s.total_tokens,
                                                 s.reasoning_tokens, s.cached_tokens })
    assert.are.equal((1000 * 1 + 500 * 2) / 1e6 * 0.5, s.cost)
    assert.are.same({ 30, 12, 42, 3 }, { s.lines_usage.prompt_tokens, s.lines_usage.completion_tokens,
                                         s.lines_usage.total_tokens, s.lines_usage.cached_tokens })
    assert.are.equal((30 * 1 + 12 * 2) / 1e6 * 0.5, s.lines_usage.cost)
    assert.are.same({ 3, 1000, 500 }, { s.by_model["gpt-5-mini"].requests, s.by_model["gpt-5-mini"].prompt_tokens,
                                        s.by_model["gpt-5-mini"].completion_tokens })
    assert.are.equal(30, s.lines_usage.by_model["gpt-5-mini"].prompt_tokens)
    assert.are.same({ 3, 3, 0 }, { s.total, s.ok, s.failed })       -- the counts are the lines' still
    -- equal figures: no difference to tell
    s = assert(assert(results.open({ output = out })):summary({ batches = { batch("gpt-5-mini", 30, 12, 3) } }))
    assert.are.same({ "batch", false }, { s.usage_source, s.usage_differs })
  end)

  it("the report reads the shards' usage (the journal's) and says when the lines sum to something else", function()
    local shards = { { name = "s1", output = out, status = "completed", model = "gpt-5-mini",
                       counts = { total = 3, completed = 3, failed = 0 },
                       usage = batch("gpt-5-mini", 1000, 500, 3).usage } }
    local sm = assert(report.summary(shards, { prices = prices }))
    assert.are.same({ "batch", 1500 }, { sm.usage_source, sm.total_tokens })
    local html = report.html({ run = "r", shards = shards, summary = sm })
    assert.truthy(html:find("1500 tokens", 1, true))
    assert.truthy(html:find('id="usage-note"', 1, true))
    assert.truthy(html:find("the result lines sum to 30 in, 12 out", 1, true))
    -- a shard without usage (DashScope: its batch has none): the lines' sum, no note
    shards[1].usage = nil
    sm = assert(report.summary(shards, { prices = prices }))
    assert.are.same({ "lines", 42 }, { sm.usage_source, sm.total_tokens })
    assert.is_nil(report.html({ run = "r", shards = shards, summary = sm }):find("usage-note", 1, true))
  end)
end)
