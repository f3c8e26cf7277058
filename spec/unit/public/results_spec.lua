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
  { "spaces", "  spaces before and after  " },    -- (an empty one is refused: csv_no_content)
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

-- Hand-made output and error files as the services write them (no server):
-- what counts as ok, the class of each failure, resubmit and summary.
describe("results: ok, classes, resubmit and summary", function()
  local cost = require "lbatch.impl.formats.cost"
  local dir
  setup(function() dir = H.tmpdir() end)

  local function chat_body(model, content, usage, reasoning)
    return { id = "chatcmpl-1", object = "chat.completion", created = 1776432582, model = model,
             choices = { { index = 0, finish_reason = "stop",
                           message = { role = "assistant", content = content, reasoning_content = reasoning } } },
             usage = usage }
  end
  local function out_line(id, status, body, err)
    return cjson.encode({ id = "batch_req_" .. id, custom_id = id,
      response = { status_code = status, request_id = "req-" .. id, body = body == nil and cjson.null or body },
      error = err or cjson.null })
  end
  -- an error file line: the error in the body and in the line, as both services write it
  local function err_line(id, status, code, message, typ)
    return cjson.encode({ id = "batch_req_" .. id, custom_id = id,
      response = { status_code = status, request_id = "req-" .. id, body = { error = {
        code = code == nil and cjson.null or code, message = message, type = typ or "invalid_request_error",
        param = cjson.null } } },
      error = { code = code == nil and cjson.null or code, message = message } })
  end

  -- id -> {class, code} (class nil: ok), in input order
  local CASES = {
    { "ds-ok", nil },                                   -- DashScope, thinking, reasoning tokens
    { "oa-ok", nil },                                   -- OpenAI, o-series reasoning tokens
    { "ds-native", nil },                               -- input_tokens / output_tokens_details
    { "up-500", "retryable", "server_error" },          -- error null, a 500 inside
    { "up-429", "retryable", "rate_limit_exceeded" },
    { "throttled", "retryable", "Throttling.RateQuota" },
    { "gateway", "retryable", "http_502" },              -- no code at all: the status says
    { "no-body", "retryable", "empty_body" },            -- 200, error null, body null
    { "empty-body", "retryable", "empty_body" },         -- 200, body {}
    { "expired", "retryable", "batch_expired" },
    { "never", "retryable", "missing" },                 -- no result anywhere
    { "inspected", "permanent", "data_inspection_failed" },
    { "invalid", "permanent", "http_400" },              -- OpenAI: code null, invalid_request_error
    { "too-long", "permanent", "context_length_exceeded" },
    { "no-model", "permanent", "model_not_found" },
    { "arrears", "account", "Arrearage" },
    { "quota", "account", "insufficient_quota" },        -- a 429, but no retry helps
    { "billing", "account", "billing_hard_limit_reached" },
    { "bad-key", "account", "invalid_api_key" },
    { "denied", "account", "AccessDenied" },             -- 403: the status says
  }

  local function files()
    local inputs = {}
    for i, c in ipairs(CASES) do
      -- odd spacing and non-ASCII: resubmit must copy the line, not re-encode it
      inputs[i] = ('{"custom_id": "%s",  "method":"POST", "url":"/v1/chat/completions", "body":{"model":"qwen-plus",'
        .. '"messages":[{"role":"user","content":"问题 %d \\u00e9"}]}}'):format(c[1], i)
    end
    local out = {
      out_line("ds-ok", 200, chat_body("qwen3-plus", "4", { prompt_tokens = 10, completion_tokens = 50,
        total_tokens = 60, completion_tokens_details = { reasoning_tokens = 30 } }, "2 + 2 is 4")),
      out_line("oa-ok", 200, chat_body("o4-mini", "Paris", { prompt_tokens = 20, completion_tokens = 100,
        total_tokens = 120, completion_tokens_details = { reasoning_tokens = 64, accepted_prediction_tokens = 0 },
        prompt_tokens_details = { cached_tokens = 0 } })),
      out_line("ds-native", 200, { model = "qwen3-plus", output = { text = "ok" },
        usage = { input_tokens = 5, output_tokens = 7, output_tokens_details = { reasoning_tokens = 3 } } }),
      out_line("up-500", 500, { error = { code = "server_error", type = "server_error", param = cjson.null,
        message = "The server had an error while processing your request. Sorry about that!" } }),
      out_line("up-429", 429, { error = { code = "rate_limit_exceeded", type = "requests", param = cjson.null,
        message = "Rate limit reached for requests. Please try again later." } }),
      out_line("gateway", 502, { error = { message = "Bad gateway" } }),
      out_line("no-body", 200, nil),
      out_line("empty-body", 200, {}),
    }
    local errs = {
      err_line("throttled", 429, "Throttling.RateQuota", "Requests rate limit exceeded, please try again later.",
        "Throttling.RateQuota"),
      cjson.encode({ id = "batch_req_x", custom_id = "expired", response = cjson.null, error = {
        code = "batch_expired", message = "This request could not be executed before the completion window expired." } }),
      err_line("inspected", 400, "data_inspection_failed", "Input data may contain inappropriate content.",
        "data_inspection_failed"),
      err_line("invalid", 400, nil, "Invalid value for 'messages[0].role': 'usr'.", "invalid_request_error"),
      err_line("too-long", 400, "context_length_exceeded", "This model's maximum context length is 8192 tokens."),
      err_line("no-model", 404, "model_not_found", "The provided model x is not supported by the Batch API."),
      err_line("arrears", 400, "Arrearage", "Access denied, please make sure your account is in good standing.",
        "Arrearage"),
      err_line("quota", 429, "insufficient_quota", "You exceeded your current quota, please check your plan and "
        .. "billing details.", "insufficient_quota"),
      err_line("billing", 400, "billing_hard_limit_reached", "Billing hard limit has been reached."),
      err_line("bad-key", 401, "invalid_api_key", "Incorrect API key provided."),
      err_line("denied", 403, "AccessDenied", "Access denied."),
    }
    return H.write(dir .. "/in.jsonl", table.concat(inputs, "\n") .. "\n"),
           H.write(dir .. "/out.jsonl", table.concat(out, "\n") .. "\n"),
           H.write(dir .. "/err.jsonl", table.concat(errs, "\n") .. "\n"), inputs
  end

  it("counts a record ok only with a 2xx status, a body and no error", function()
    local path = H.write(dir .. "/ok.jsonl", table.concat({
      out_line("a", 200, chat_body("qwen-plus", "hi", { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 })),
      out_line("b", 201, { object = "list", data = { { embedding = { 0.1 } } } }),     -- any 2xx
      out_line("c", 500, { error = { code = "server_error", message = "x" } }),         -- error null, 500 inside
      out_line("d", 500, chat_body("qwen-plus", "hi")),                                 -- a body, but a 500
      out_line("e", 200, nil),
      out_line("f", 200, {}),
      out_line("g", 200, { error = { code = "server_error", message = "x" } }),         -- 200 with an error body
      out_line("h", 200, chat_body("qwen-plus", "hi"), { code = "batch_expired", message = "x" }),
      '{"custom_id":"i","error":null}',
      "not json",
    }, "\n") .. "\n")
    local got = {}
    for rec in results.open({ output = path }):each() do got[#got + 1] = { rec.ok, rec.class } end
    assert.are.same({ { true }, { true }, { false, "retryable" }, { false, "retryable" }, { false, "retryable" },
                      { false, "retryable" }, { false, "retryable" }, { false, "retryable" },
                      { false, "permanent" }, { false, "retryable" } }, got)
    assert.is_nil((results.classify({ ok = true })))
    assert.are.same({ "permanent", "no_response" }, { results.classify({ ok = false }) })
  end)

  it("raises on options of the wrong type (a programming error), before reading anything", function()
    local r = assert(results.open({ output = H.write(H.tmpdir() .. "/o.jsonl", "") }))
    for _, call in ipairs({ { "summary", "results.summary: opts must be a table" } }) do
      local ok, msg = pcall(r[call[1]], r, "prices.json")
      assert.is_false(ok)
      assert.matches(call[2], msg, 1, true)
    end
  end)

  it("counts a result outside 2xx by its status, and a 2xx one without a body as empty_body: at each edge", function()
    for _, case in ipairs({ { 199, false, "http_199" }, { 200, false, "empty_body" }, { 299, false, "empty_body" },
                            { 300, false, "http_300" }, { 404, false, "http_404" }, { 200, true } }) do
      local body = case[2] ~= false and { choices = { { message = { content = "x" } } } } or {}
      local rec = results.record(cjson.encode({ custom_id = "a", response = { status_code = case[1], body = body } }))
      assert.are.equal(case[3] == nil, rec.ok, case[1])
      assert.are.equal(case[3], select(2, results.classify(rec)), case[1])
    end
    local bad = results.record(cjson.encode({ custom_id = "a", response = { status_code = 300,
      body = { choices = { { message = { content = "x" } } } } } }))
    assert.is_false(bad.ok)                                            -- a body does not make a 3xx ok
    assert.are.equal("http_300", select(2, results.classify(bad)))
  end)

  it("classifies each failure as retryable, permanent or account, DashScope's and OpenAI's", function()
    local input, out, err = files()
    local r = assert(results.open({ output = out, errors = err, inputs = input }))
    local i = 0
    for rec in r:each() do
      i = i + 1
      local c = CASES[i]
      assert.are.equal(c[1], rec.custom_id)
      assert.are.equal(c[2] == nil, rec.ok, c[1])
      assert.are.equal(c[2], rec.class, c[1])
      local class, code = results.classify(rec)
      assert.are.same({ c[2], c[3] }, { class, code }, c[1])
    end
    assert.are.equal(#CASES, i)
    assert.are.same({ "retryable", "permanent", "account" },
      { results.CLASSES.server_error, results.CLASSES.data_inspection_failed, results.CLASSES.Arrearage })
    assert.are.same({ "retryable", "retryable", "account", "permanent", "retryable" },
      { results.status_class(429), results.status_class(503), results.status_class(401),
        results.status_class(422), results.status_class(408) })
    assert.is_nil(results.status_class(200))
  end)

  local function ids_and_lines(path)
    local ids, lines = {}, {}
    for l in io.lines(path) do lines[#lines + 1] = l ids[#ids + 1] = cjson.decode(l).custom_id end
    return ids, lines
  end
  local function want(classes, inputs)
    local ids, lines = {}, {}
    for i, c in ipairs(CASES) do
      if c[2] and classes[c[2]] then ids[#ids + 1] = c[1] lines[#lines + 1] = inputs[i] end
    end
    return ids, lines
  end

  it("resubmits the retryable ones by default, others when asked, byte for byte", function()
    local input, out, err, inputs = files()
    local r = assert(results.open({ output = out, errors = err, inputs = input }))
    local path = dir .. "/again.jsonl"
    local n, taken = r:resubmit(path)
    local wid, wlines = want({ retryable = true }, inputs)
    assert.are.same({ #wid, { retryable = #wid } }, { n, taken })
    assert.are.same({ "up-500", "up-429", "throttled", "gateway", "no-body", "empty-body", "expired", "never" }, wid)
    local ids, lines = ids_and_lines(path)
    assert.are.same(wid, ids)
    assert.are.same(wlines, lines)                     -- the input lines as they were
    n, taken = r:resubmit(path, { classes = { "retryable", "permanent" } })
    wid, wlines = want({ retryable = true, permanent = true }, inputs)
    assert.are.same({ #wid, { retryable = 8, permanent = 4 } }, { n, taken })
    assert.are.same({ wid, wlines }, { ids_and_lines(path) })
    for _, o in ipairs({ { all = true }, { failed = true } }) do
      n, taken = r:resubmit(path, o)
      wid, wlines = want({ retryable = true, permanent = true, account = true }, inputs)
      assert.are.same({ 17, { retryable = 8, permanent = 4, account = 5 } }, { n, taken })
      assert.are.same({ wid, wlines }, { ids_and_lines(path) })
    end
    assert.are.equal(5, (r:resubmit(path, { classes = { "account" } })))
    assert.has_error(function() r:resubmit(path, { classes = { "retry" } }) end,
      "lbatch.results.resubmit: opts.classes holds retryable, permanent, account or invalid_answer (got retry)")
  end)

  it("sums up by class and by code, and counts reasoning tokens apart, billed as output", function()
    local input, out, err = files()
    local r = assert(results.open({ output = out, errors = err, inputs = input }))
    local prices = { ["qwen3-plus"] = { input = 0.8, output = 8 }, ["o4-mini"] = { input = 1.1, output = 4.4 } }
    local s = assert(r:summary({ prices = prices }))
    assert.are.same({ 20, 3, 16, 1 }, { s.total, s.ok, s.failed, s.missing })
    assert.are.same({ retryable = 8, permanent = 4, account = 5 }, s.by_class)
    assert.are.same({ server_error = 1, rate_limit_exceeded = 1, ["Throttling.RateQuota"] = 1, http_502 = 1,
      empty_body = 2, batch_expired = 1, missing = 1, data_inspection_failed = 1, http_400 = 1,
      context_length_exceeded = 1, model_not_found = 1, Arrearage = 1, insufficient_quota = 1,
      billing_hard_limit_reached = 1, invalid_api_key = 1, AccessDenied = 1 }, s.by_code)
    assert.is_nil(s.by_error.missing)
    assert.are.equal(1, s.by_error.server_error)
    assert.are.same({ 35, 157, 97, 192 }, { s.prompt_tokens, s.completion_tokens, s.reasoning_tokens, s.total_tokens })
    assert.are.same({ 2, 15, 57, 33 }, { s.by_model["qwen3-plus"].requests, s.by_model["qwen3-plus"].prompt_tokens,
      s.by_model["qwen3-plus"].completion_tokens, s.by_model["qwen3-plus"].reasoning_tokens })
    assert.are.equal(64, s.by_model["o4-mini"].reasoning_tokens)
    -- the thinking is in completion_tokens, and so in the cost
    local expect = cost.of(15, 57, prices["qwen3-plus"]) + cost.of(20, 100, prices["o4-mini"])
    assert.is_true(math.abs(s.cost - expect) < 1e-12, s.cost .. " " .. expect)
  end)
end)

-- A results file holding invalid UTF-8 and NUL bytes (a service, a proxy or
-- a disk can write them): the command's JSONL and CSV are still valid
-- UTF-8 that a strict outside reader (Python's json and csv) takes whole.
describe("results output whatever the bytes", function()
  local BAD = { "caf\233 ok", "nul\0inside", "cut \226\130", "surrogate \237\160\128!", "fine ✓" }

  it("repair: each bad byte as U+FFFD, NUL only when asked, good text untouched", function()
    assert.are.same({ "caf\239\191\189 ok", true }, { results.repair("caf\233 ok") })
    assert.are.same({ "cut \239\191\189\239\191\189", true }, { results.repair("cut \226\130") })
    assert.are.same({ "nul\0inside", false }, { results.repair("nul\0inside") })
    assert.are.same({ "nul\239\191\189inside", true }, { results.repair("nul\0inside", true) })
    assert.are.same({ "fine ✓", false }, { results.repair("fine ✓", true) })
    local t, changed = results.sanitize({ a = { "x\255" }, n = 3 })
    assert.are.same({ { a = { "x\239\191\189" }, n = 3 }, true }, { t, changed })
    local clean = { a = { "fine ✓" }, n = 3 }
    assert.are.same({ clean, false }, { results.sanitize(clean) })
    assert.are.equal(clean, (results.sanitize(clean)))                 -- not copied
  end)

  it("lbatch results writes JSONL and CSV a strict reader takes, and says how many it repaired", function()
    if not H.ok("command -v python3 >/dev/null 2>&1") then pending("no python3") return end
    local dir = H.tmpdir()
    local lines = {}
    for i, text in ipairs(BAD) do
      -- the bytes as they arrive: raw in the JSON string (cjson would escape NUL)
      lines[i] = ('{"custom_id":"r%d","response":{"status_code":200,"request_id":"q","body":{"model":"m",'
        .. '"choices":[{"message":{"role":"assistant","content":"%s"}}],"usage":{"prompt_tokens":1,'
        .. '"completion_tokens":1,"total_tokens":2}}},"error":null}'):format(i, (text:gsub("%z", "\\u0000")))
    end
    H.write(dir .. "/out.jsonl", table.concat(lines, "\n") .. "\n")
    local cmd = ("%s %s/bin/lbatch results %s/out.jsonl"):format(H.lua, H.root, dir)
    assert.is_true(H.ok(("%s > %s/r.jsonl 2>%s/err1"):format(cmd, dir, dir)))
    assert.is_true(H.ok(("%s --csv %s/r.csv 2>%s/err2"):format(cmd, dir, dir)))
    assert.matches("3 record(s) held invalid UTF-8 or NUL bytes", H.read(dir .. "/err1"), 1, true)
    assert.matches("4 record(s) held invalid UTF-8 or NUL bytes", H.read(dir .. "/err2"), 1, true)
    local py = [[
import csv, json, sys
d = sys.argv[1]
with open(d + "/r.jsonl", encoding="utf-8", errors="strict") as f:
    rows = [json.loads(l) for l in f]
with open(d + "/r.csv", encoding="utf-8", errors="strict", newline="") as f:
    cells = list(csv.reader(f))
assert not any("\0" in c for r in cells for c in r)
print(len(rows), len(cells) - 1, json.dumps([r["content"] for r in rows]))
]]
    H.write(dir .. "/check.py", py)
    local out = H.sh(("python3 %s/check.py %s 2>&1"):format(dir, dir))
    local want = cjson.encode({ "caf\239\191\189 ok", "nul\0inside", "cut \239\191\189\239\191\189",
      "surrogate \239\191\189\239\191\189\239\191\189!", "fine ✓" })
    local got = cjson.decode((assert(out:match("^5 5 (.*)\n$"), out)))
    assert.are.same(cjson.decode(want), got)
  end)
end)
