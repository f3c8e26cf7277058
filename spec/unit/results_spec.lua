-- Results read back from real emulator batches: the join with inputs, CSV
-- round trips, partial results of cancelled and expired batches, resubmit.
local H = require "helper"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local csv = require "lbatch.csv"
local cjson = require "cjson"

local AWKWARD = {
  { "plain", "What is 2 + 2?" },
  { "comma", "apples, pears, and plums" },
  { "quote", 'she said "hello" and ""left""' },
  { "newline", "line one\nline two\r\nline three" },
  { "chinese", "北京的天气怎么样？请用中文回答。" },
  { "emoji", "rate this 🍕🚀 from 1 to 5 👍🏽" },
  { "empty", "" },
  { "mixed", 'a,"b"\n中文,😀' },
}

describe("results", function()
  local emu, dir, client
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
    client = lbatch.new({ api_key = "k", base_url = emu.base })
  end)
  teardown(function() client:close() emu.stop() end)

  local function run_batch(path, endpoint, metadata)
    local f = assert(client:upload(path))
    local b = assert(client:create({ input_file_id = f.id, endpoint = endpoint or "/v1/chat/completions",
                                     metadata = metadata }))
    return b
  end

  local function wait(id, want)
    local b
    repeat client:sleep(0.05); b = assert(client:retrieve(id)) until not want and (b.completed_at or b.failed_at
      or b.cancelled_at or b.expired_at) or want and b.status == want
    return b
  end

  local function download(b)
    local out, err
    if b.output_file_id then out = assert(client:content(b.output_file_id, { path = dir .. "/" .. b.id .. ".out" })) end
    if b.error_file_id then err = assert(client:content(b.error_file_id, { path = dir .. "/" .. b.id .. ".err" })) end
    return out, err
  end

  it("round-trips CSV -> JSONL -> emulator -> results -> CSV with awkward content", function()
    local w = csv.writer(dir .. "/questions.csv", { bom = true })
    w:row({ "id", "question" })
    for _, r in ipairs(AWKWARD) do w:row(r) end
    w:close()
    local m = assert(csv.to_jsonl(dir .. "/questions.csv", { path = dir .. "/q.jsonl", model = "qwen-plus",
                                                              system = "Answer briefly.", temperature = 0 }))
    assert.are.equal(#AWKWARD, m.lines)
    assert.is_true(jsonl.validate(m.files[1].path).ok)
    local b = wait(run_batch(m.files[1].path).id)
    assert.are.equal("completed", b.status)
    local out = download(b)
    local reader = results.open({ output = out, inputs = m.files[1].path })
    local n = assert(csv.from_results(reader, dir .. "/answers.csv", { bom = true,
      columns = { "custom_id", "input", "content", "status_code", "model", "usage" } }))
    assert.are.equal(#AWKWARD, n)
    local raw = H.read(dir .. "/answers.csv")
    assert.are.equal("\239\187\191", raw:sub(1, 3))
    local rows = {}
    for row in csv.rows(dir .. "/answers.csv") do rows[#rows + 1] = row end
    assert.are.same({ "custom_id", "input", "content", "status_code", "model", "usage" }, rows[1])
    for i, r in ipairs(AWKWARD) do
      local row = rows[i + 1]
      assert.are.equal(r[1], row[1])
      assert.are.equal(r[2], row[2])      -- byte for byte, CRLF inside the field included
      assert.are.equal("Emulated answer (qwen-plus): " .. r[2], row[3])
      assert.are.equal("200", row[4])
      assert.are.equal("qwen-plus", row[5])
      assert.matches("^%d+/%d+/%d+$", row[6])
    end
  end)

  it("joins outputs and errors to inputs, names the missing, and sums up", function()
    local path = H.requests(dir .. "/j.jsonl", 6, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function(i) return i == 3 and "lbatch-emulator:fail" or ("q" .. i) end })
    local b = wait(run_batch(path).id)
    local out, err = download(b)
    -- an input file with one more request that never ran anywhere
    local extra = H.write(dir .. "/extra.jsonl", cjson.encode({ custom_id = "ghost", method = "POST",
      url = "/v1/chat/completions", body = { model = "qwen-plus", messages = {} } }) .. "\n")
    local r = results.open({ output = out, errors = err, inputs = { path, extra } })
    local seen = {}
    for rec in r:each() do seen[#seen + 1] = rec end
    assert.are.equal(7, #seen)
    assert.are.same({ "req-1", "req-2", "req-3", "req-4", "req-5", "req-6", "ghost" },
      (function() local t = {} for i, x in ipairs(seen) do t[i] = x.custom_id end return t end)())
    assert.is_true(seen[1].ok)
    assert.are.equal("q1", seen[1].prompt)
    assert.matches("q1$", seen[1].content)
    assert.are.equal("qwen-plus", seen[1].input.body.model)
    assert.is_false(seen[3].ok)
    assert.are.same({ 400, "emulated_failure" }, { seen[3].status_code, seen[3].error_code })
    -- whole numbers come out as integers on every Lua (lua-cjson 2.1.0 decodes floats)
    assert.are.equal("200", tostring(seen[1].status_code))
    assert.are.equal(tostring(seen[1].usage.total_tokens), ("%d"):format(seen[1].usage.total_tokens))
    if math.type then
      assert.are.equal("integer", math.type(seen[1].status_code))
      assert.are.equal("integer", math.type(seen[1].created))
    end
    assert.is_true(seen[7].missing)
    assert.are.same({ "ghost" }, r.missing_ids)
    local s = r:summary({ prices = { ["qwen-plus"] = { input = 2, output = 8 } } })
    assert.are.same({ 7, 5, 1, 1 }, { s.total, s.ok, s.failed, s.missing })
    assert.are.equal(1, s.by_error.emulated_failure)
    assert.is_true(s.prompt_tokens > 0 and s.completion_tokens > 0)
    assert.are.equal(s.prompt_tokens + s.completion_tokens, s.total_tokens)
    if math.type then assert.are.equal("integer", math.type(s.total_tokens)) end
    local expect = (s.prompt_tokens * 2 + s.completion_tokens * 8) / 1e6 * 0.5
    assert.is_true(math.abs(s.cost - expect) < 1e-12)
    -- without inputs: every line of both files, outputs first
    local plain = 0
    for rec in results.open({ output = out, errors = err }):each() do
      plain = plain + 1
      assert.is_string(rec.custom_id)
    end
    assert.are.equal(6, plain)
  end)

  it("reads embeddings", function()
    local path = H.requests(dir .. "/emb.jsonl", 2, { line = function(i)
      return { custom_id = "e" .. i, method = "POST", url = "/v1/embeddings",
               body = { model = "text-embedding-v4", input = "text " .. i, dimensions = 8 } }
    end })
    local b = wait(run_batch(path, "/v1/embeddings").id)
    local out = download(b)
    for rec in results.open({ output = out }):each() do
      assert.is_true(rec.ok)
      assert.are.equal(8, #rec.embedding)
    end
  end)

  local function partial(kind)
    local path = H.requests(dir .. "/" .. kind .. ".jsonl", 20, { url = "/v1/chat/completions", model = "qwen-plus" })
    local b
    if kind == "cancelled" then
      b = run_batch(path, nil, { emulator_line_seconds = "10" })        -- 0.05 s a line
      repeat client:sleep(0.05); b = assert(client:retrieve(b.id)) until b.request_counts.completed >= 5
      assert(client:cancel(b.id))
    else
      b = run_batch(path, nil, { emulator_line_seconds = "7200" })      -- 12 lines fit in 24h
      wait(b.id, "in_progress")
      assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 25 * 3600 } })))
    end
    b = wait(b.id)
    assert.are.equal(kind, b.status)
    local out, err = download(b)
    return path, out, err, b
  end

  for _, kind in ipairs({ "cancelled", "expired" }) do
    it("reads the partial results of a " .. kind .. " batch and resubmits exactly the rest", function()
      local path, out, err, b = partial(kind)
      assert.is_truthy(out)
      assert.is_truthy(err)
      local r = results.open({ output = out, errors = err, inputs = path })
      local ran, not_run = {}, {}
      for rec in r:each() do
        if rec.ok then ran[#ran + 1] = rec.custom_id
        else
          assert.are.equal(kind == "cancelled" and "batch_cancelled" or "batch_expired", rec.error_code)
          not_run[#not_run + 1] = rec.custom_id
        end
      end
      assert.are.equal(20, #ran + #not_run)
      assert.is_true(#ran >= 5 and #not_run >= 1)
      assert.are.equal(b.request_counts.completed, #ran)
      local again = dir .. "/" .. kind .. "-again.jsonl"
      assert.are.equal(#not_run, r:resubmit(again))
      -- exactly the requests that did not run, byte for byte as they went in
      local originals = {}
      for l in io.lines(path) do originals[cjson.decode(l).custom_id] = l end
      local ids = {}
      for l in io.lines(again) do
        local id = cjson.decode(l).custom_id
        ids[#ids + 1] = id
        assert.are.equal(originals[id], l)
      end
      assert.are.same(not_run, ids)
      assert.is_true(jsonl.validate(again).ok)
      -- and they run to completion as a new batch
      local b2 = wait(run_batch(again).id)
      assert.are.equal("completed", b2.status)
      assert.are.equal(#not_run, b2.request_counts.completed)
    end)
  end
end)
