-- Results that look fine and are not, from real batches on the emulator:
-- lines with error null and a 500 or 429 inside (line_errors), a batch
-- completed with no output file (empty_output), an account in arrears
-- (arrears); downloaded with lbatch's client, read with results.open:
-- classes, counts, and resubmit taking only what is worth sending again.
local H = require "helper"
local lbatch = require "lbatch"
local results = require "lbatch.results"
local cjson = require "cjson"

describe("results of failing batches", function()
  local emu, dir, c
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
    c = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
  end)
  teardown(function() c:close() emu.stop() end)

  local function modes(changes)
    local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = changes })
    assert.are.equal(200, status, cjson.encode(body))
  end

  -- a batch of path run to its end, its files downloaded: batch, output, errors
  local function run(path)
    local f = assert(c:upload(path))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    b = assert(c:wait(b.id, { interval = 0.05 }))
    local out, err
    if b.output_file_id then out = assert(c:content(b.output_file_id, { path = path .. ".out" })) end
    if b.error_file_id then err = assert(c:content(b.error_file_id, { path = path .. ".err" })) end
    return b, out, err
  end

  local function lines(path)
    local t = {}
    for l in io.lines(path) do t[#t + 1] = l end
    return t
  end

  local function classes(r)
    local t = {}
    for rec, err in r:each() do
      assert(rec, tostring(err))
      t[#t + 1] = rec.ok and "ok" or rec.class
    end
    return t
  end

  it("lines with error null and a 500 inside are retryable, resubmitted byte for byte, and then run", function()
    modes({ line_errors = { status = 500, every = 3 } })
    local path = H.requests(dir .. "/le.jsonl", 7, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function(i) return i == 5 and "lbatch-emulator:fail" or ("q " .. i) end })
    local b, out, err = run(path)
    modes({ line_errors = false })
    assert.are.equal("completed", b.status)
    assert.are.same({ 7, 3, 4 }, { b.request_counts.total, b.request_counts.completed, b.request_counts.failed })
    local r = assert(results.open({ output = out, errors = err, inputs = path }))
    -- lines 1, 4, 7: a 500 in the output file; line 5 refused (400): the same again
    assert.are.same({ "retryable", "ok", "ok", "retryable", "permanent", "ok", "retryable" }, classes(r))
    local s = assert(r:summary())
    assert.are.same({ 7, 3, 4, 0 }, { s.total, s.ok, s.failed, s.missing })
    assert.are.same({ retryable = 3, permanent = 1 }, s.by_class)
    assert.are.same({ server_error = 3, emulated_failure = 1 }, s.by_code)
    local again = dir .. "/le-again.jsonl"
    local n, taken = r:resubmit(again)
    assert.are.same({ 3, { retryable = 3 } }, { n, taken })
    local input = lines(path)
    assert.are.same({ input[1], input[4], input[7] }, lines(again))
    assert.are.equal(4, (r:resubmit(again, { all = true })))
    assert.are.same({ input[1], input[4], input[5], input[7] }, lines(again))
    -- the 429s of another batch are retryable too; with the mode off the retried lines run
    modes({ line_errors = { status = 429, every = 2 } })
    path = H.requests(dir .. "/rl.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus" })
    b, out, err = run(path)
    modes({ line_errors = false })
    assert.are.equal(2, b.request_counts.failed)
    r = assert(results.open({ output = out, errors = err, inputs = path }))
    assert.are.same({ "retryable", "ok", "retryable" }, classes(r))
    assert.are.same({ rate_limit_exceeded = 2 }, assert(r:summary()).by_code)
    assert.are.equal(2, (r:resubmit(again)))
    b, out = run(again)
    assert.are.same({ 2, 0 }, { b.request_counts.completed, b.request_counts.failed })
    r = assert(results.open({ output = out, inputs = again }))
    assert.are.same({ "ok", "ok" }, classes(r))
  end)

  it("a batch completed with no output file: every line in the error file, retryable", function()
    modes({ empty_output = true })
    local path = H.requests(dir .. "/eo.jsonl", 4, { url = "/v1/chat/completions", model = "qwen-plus" })
    local b, out, err = run(path)
    modes({ empty_output = false })
    assert.are.equal("completed", b.status)
    assert.is_nil(b.output_file_id)
    assert.is_nil(out)
    assert.are.same({ 4, 0, 4 }, { b.request_counts.total, b.request_counts.completed, b.request_counts.failed })
    local r = assert(results.open({ output = out, errors = err, inputs = path }))
    assert.are.same({ "retryable", "retryable", "retryable", "retryable" }, classes(r))
    local s = assert(r:summary())
    assert.are.same({ 4, 0, 4 }, { s.total, s.ok, s.failed })
    assert.are.same({ internal_error = 4 }, s.by_code)
    local again = dir .. "/eo-again.jsonl"
    assert.are.equal(4, (r:resubmit(again)))
    assert.are.equal(H.read(path), H.read(again))          -- the whole input, byte for byte
  end)

  it("an account in arrears: every line an account failure, never resubmitted unasked", function()
    modes({ arrears = { after = 0 } })
    local path = H.requests(dir .. "/ar.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus" })
    local b, out, err = run(path)
    modes({ arrears = false })
    assert.are.equal("completed", b.status)
    local r = assert(results.open({ output = out, errors = err, inputs = path }))
    local seen = {}
    for rec in r:each() do
      seen[#seen + 1] = { rec.ok, rec.class, rec.status_code, rec.error_code }
    end
    assert.are.same({ { false, "account", 400, "Arrearage" }, { false, "account", 400, "Arrearage" },
                      { false, "account", 400, "Arrearage" } }, seen)
    local s = assert(r:summary())
    assert.are.same({ account = 3 }, s.by_class)
    assert.are.same({ Arrearage = 3 }, s.by_code)
    local again = dir .. "/ar-again.jsonl"
    assert.are.same({ 0, {} }, { r:resubmit(again) })
    assert.are.equal("", H.read(again))
    assert.are.same({ 3, { account = 3 } }, { r:resubmit(again, { classes = { "account" } }) })
    assert.are.equal(H.read(path), H.read(again))
  end)
end)
