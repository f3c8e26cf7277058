-- Nothing the official SDKs or the service's documents offer is missing:
-- every parameter goes through, per-call options, raw responses, both
-- iterators, every endpoint, each service's limits, and the stricter
-- validation rules (each with its exact line). Against the emulator, in
-- both dialects; /_emulator/last shows what a client really sent.
local H = require "helper"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local cjson = require "cjson"

local function last(emu) return (select(2, H.json("GET", emu.url .. "/_emulator/last"))) end

local msgs = { { role = "user", content = "hi" } }

for _, dialect in ipairs({ "dashscope", "openai" }) do
  describe("SDK parameters (" .. dialect .. " dialect)", function()
    local emu, c, dir, file
    setup(function()
      emu = H.emulator({ speed = 200, rate_limits = false, dialect = dialect })
      c = lbatch.new({ api_key = "k", base_url = emu.base, region = dialect == "openai" and "openai" or "cn",
                       max_retries = 0 })
      dir = H.tmpdir()
      file = assert(c:upload(H.requests(dir .. "/p.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })))
    end)
    teardown(function() c:close() emu.stop() end)
    before_each(function() H.http("DELETE", emu.url .. "/_emulator/faults") end)

    it("create sends every field it is given (output_expires_after, and fields lbatch does not know)", function()
      local b = assert(c:create({ input_file_id = file.id, endpoint = "/v1/chat/completions",
        output_expires_after = { anchor = "created_at", seconds = 7200 }, x_future_field = "yes",
        metadata = { ds_name = "parity" } }))
      local sent = last(emu).body
      assert.are.same({ anchor = "created_at", seconds = 7200 }, sent.output_expires_after)
      assert.are.equal("yes", sent.x_future_field)
      assert.are.equal("24h", sent.completion_window)
      assert.are.equal("parity", b.metadata.ds_name)
      local v, err = c:create({ input_file_id = file.id, endpoint = "/v1/chat/completions",
        output_expires_after = { anchor = "created_at", seconds = 5 } })
      assert.is_nil(v)
      assert.are.equal("invalid_output_expires_after", err.code)
    end)

    it("list_batches and list_files send every query field", function()
      assert(c:list_batches({ limit = 3, status = { "completed", "failed" }, ds_name = "x", x_future = "1" }))
      local q = last(emu).query
      assert.are.same({ "3", "completed,failed", "x", "1" }, { q.limit, q.status, q.ds_name, q.x_future })
      assert(c:list_files({ order = "asc", purpose = "batch", limit = 2, x_future = "2" }))
      q = last(emu).query
      assert.are.same({ "asc", "batch", "2", "2" }, { q.order, q.purpose, q.limit, q.x_future })
    end)

    it("upload sends every form field; expires_after as the SDKs encode it; bytes made in memory", function()
      local f = assert(c:upload(H.requests(dir .. "/e.jsonl", 1), { purpose = "batch",
        expires_after = { anchor = "created_at", seconds = 86400 }, x_future = "3" }))
      local form = last(emu).form
      assert.are.same({ "batch", "created_at", "86400", "3" },
        { form.purpose, form["expires_after[anchor]"], form["expires_after[seconds]"], form.x_future })
      if dialect == "openai" then assert.are.equal(f.created_at + 86400, f.expires_at) end
      local data = '{"custom_id":"mem-1","method":"POST","url":"/v1/chat/completions",'
        .. '"body":{"model":"qwen-plus","messages":[{"role":"user","content":"from memory"}]}}\n'
      local m = assert(c:upload({ data = data, filename = "memory.jsonl" }))
      assert.are.same({ #data, "memory.jsonl" }, { m.bytes, m.filename })
      if dialect == "openai" then assert.are.equal(data, assert(c:content(m.id))) end
    end)

    it("per-call options: timeout, headers, max_retries", function()
      H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/v1/batches$", delay = 5 } })
      local t0 = H.now()
      local v, err = c:list_batches(nil, { timeout = 0.3 })
      assert.is_nil(v)
      assert.are.equal("timeout", err.kind)
      assert.is_true(H.now() - t0 < 4)          -- gave up at its own timeout, not the server's 5 s
      H.http("DELETE", emu.url .. "/_emulator/faults")
      assert(c:retrieve(select(2, H.json("GET", emu.base .. "/batches?limit=1")).data[1].id,
        { headers = { ["X-Trace"] = "t-42", ["OpenAI-Organization"] = "org-1" } }))
      local h = last(emu).headers
      assert.are.same({ "t-42", "org-1" }, { h["x-trace"], h["openai-organization"] })
      H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/v1/files$", status = 500, times = 2 } })
      v = c:list_files()                                  -- the client's 0 retries
      assert.is_nil(v)
      assert.is_truthy(c:list_files(nil, { max_retries = 2 }))
    end)

    it("with_response: the answer's status, request_id and headers beside the value", function()
      local p, response = c:list_batches({ limit = 1 }, { with_response = true })
      assert.are.equal("list", p.object)
      assert.are.equal(200, response.status)
      assert.is_string(response.request_id)
      assert.are.equal(response.request_id, response.headers["x-request-id"])
      local v, err, r2 = c:retrieve("batch_nope", { with_response = true })
      assert.is_nil(v)
      assert.are.same({ 404, 404 }, { err.status, r2.status })
    end)

    it("request sends a line's body as it is to the real-time endpoint of its url", function()
      local v = assert(c:request("/v1/chat/completions", { model = "qwen-plus", messages = msgs, temperature = 0.3,
                                                           future_field = { a = 1 } }))
      local l = last(emu)
      assert.are.same({ "POST", "/v1/chat/completions", 0.3, 1 }, { l.method, l.path, l.body.temperature,
                                                                  l.body.future_field.a })
      assert.are.equal("Emulated answer (qwen-plus): hi", v.choices[1].message.content)
      assert(c:request("/v1/embeddings", { model = "text-embedding-v3", input = { "a", "b" }, dimensions = 8 }))
      l = last(emu)
      assert.are.same({ "/v1/embeddings", 8 }, { l.path, l.body.dimensions })
    end)

    it("iterates every file and every batch; the names before 0.2 are gone, but list (the design's name)", function()
      local want = 0
      for _ in pairs(select(2, H.json("GET", emu.base .. "/files")).data) do want = want + 1 end
      local n = 0
      for f, err in c:each_file({ limit = 2 }) do
        assert.is_truthy(f, tostring(err))
        n = n + 1
      end
      assert.are.equal(want, n)
      assert.are.equal("function", type(c.list))      -- upload/create/retrieve/list/cancel/content
      local page, perr = c:list({ limit = 100 })
      assert.is_truthy(page, tostring(perr))
      assert.are.equal(#assert(c:list_batches({ limit = 100 })).data, #page.data)
      assert.is_nil(c.files)
      assert.is_nil(c.batches)
    end)
  end)
end

describe("every batch endpoint", function()
  it("runs /v1/responses, /v1/completions and /v1/moderations batches (openai)", function()
    local emu = H.emulator({ speed = 200, rate_limits = false, dialect = "openai" })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, region = "openai" })
    local dir = H.tmpdir()
    local bodies = {
      ["/v1/responses"] = { model = "gpt-4.1-mini", input = "Say hi" },
      ["/v1/completions"] = { model = "gpt-3.5-turbo-instruct", prompt = "Say hi" },
      ["/v1/moderations"] = { input = "a kind sentence" },
    }
    for url, body in pairs(bodies) do
      local w = jsonl.writer({ path = dir .. "/" .. url:gsub("/", "_") .. ".jsonl", endpoint = url, limits = "openai" })
      assert(w:add("one", body))
      local m = assert(w:close())
      local f = assert(c:upload(m.files[1].path))
      local b = assert(c:create({ input_file_id = f.id, endpoint = url }))
      b = assert(c:wait(b.id, { interval = 0.05 }))
      assert.are.equal("completed", b.status, url)
      local out = assert(c:content(b.output_file_id, { path = dir .. "/out.jsonl" }))
      local rec = assert(results.open({ output = out }))
      for r in rec:each() do assert.is_true(r.ok, url) end
    end
    -- the same endpoints are not DashScope's
    local w = jsonl.writer({ path = dir .. "/ds.jsonl" })
    local ok, err = w:add("x", { model = "qwen-plus", input = "x" }, "/v1/responses")
    assert.is_nil(ok)
    assert.are.equal("url_not_found", err.code)
    c:close()
    emu.stop()
  end)
end)

describe("validation, rule by rule", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  local function line(id, body, url)
    return cjson.encode({ custom_id = id, method = "POST", url = url or "/v1/chat/completions", body = body })
  end

  local function check(lines, opts)
    local path = H.write(dir .. "/v.jsonl", table.concat(lines, "\n") .. "\n")
    local rep = assert(jsonl.validate(path, opts))
    local found = {}
    for _, p in ipairs(rep.problems) do found[#found + 1] = p.code .. "@" .. tostring(p.line) end
    return found, rep
  end

  it("UTF-8, with the line and the byte", function()
    local bad = '{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
      .. '"messages":[{"role":"user","content":"ok \xe4\xb8 broken"}]}}'
    local found, rep = check({ line("a", { model = "qwen-plus", messages = msgs }), bad })
    assert.are.same({ "invalid_utf8@2" }, found)
    local at = bad:find("\xe4", 1, true)
    assert.are.equal(at, rep.problems[1].offset)
    assert.matches("byte " .. at, rep.problems[1].message)
  end)

  it("each endpoint's body: chat needs messages, embeddings need input", function()
    assert.are.same({ "missing_field@1", "missing_field@2" }, (check({
      line("a", { model = "qwen-plus" }), line("b", { model = "qwen-plus", messages = {} }) })))
    assert.are.same({ "missing_field@1" }, (check({ line("a", { model = "text-embedding-v4" }, "/v1/embeddings") })))
  end)

  it("a model on the wrong endpoint", function()
    assert.are.same({ "model_endpoint_mismatch@1" }, (check({
      line("a", { model = "text-embedding-v4", messages = msgs }) })))
    assert.are.same({ "model_endpoint_mismatch@1" }, (check({
      line("a", { model = "qwen-plus", input = "x" }, "/v1/embeddings") })))
  end)

  it("thinking mode: a missing enable_thinking is the model's default", function()
    -- qwen3.5-plus thinks by default: missing and false are two modes
    assert.are.same({ "mismatched_thinking@2" }, (check({
      line("a", { model = "qwen3.5-plus", messages = msgs }),
      line("b", { model = "qwen3.5-plus", messages = msgs, enable_thinking = false }) })))
    -- qwen-plus does not: missing and false are one
    assert.are.same({}, (check({
      line("a", { model = "qwen-plus", messages = msgs }),
      line("b", { model = "qwen-plus", messages = msgs, enable_thinking = false }) })))
    -- and the writer shards them apart
    local w = jsonl.writer({ path = dir .. "/think.jsonl" })
    assert(w:add("a", { model = "qwen3.5-plus", messages = msgs }))
    assert(w:add("b", { model = "qwen3.5-plus", messages = msgs, enable_thinking = false }))
    assert.are.equal(2, #assert(w:close()).files)
  end)

  it("models outside the region's list are warnings, with the list", function()
    local found, rep = check({ line("a", { model = "qwen3.8-max", messages = msgs }) }, { region = "intl" })
    assert.are.same({}, found)
    assert.is_true(rep.ok)
    assert.are.equal("unknown_model", rep.warnings[1].code)
    assert.matches("intl region's batch list for /v1/chat/completions %(qwen3.7%-plus, qwen%-max", rep.warnings[1].message)
    found, rep = check({ line("a", { model = "qwen3.8-max", messages = msgs }) }, { region = "cn" })
    assert.are.same({}, found)
    assert.are.equal(0, #rep.warnings)
  end)

  it("the service's codes and words for a wrong url and the test model on a wrong url", function()
    local found, rep = check({ line("a", { model = "qwen-plus", messages = msgs }, "/v1/chat/completion") })
    assert.are.same({ "url_not_found@1" }, found)
    assert.are.equal("The provided url '/v1/chat/completion' is not supported by the Batch API.", rep.problems[1].message)
    found, rep = check({ line("a", { model = "batch-test-model", messages = msgs }) })
    assert.are.same({ "mismatched_test_url@1" }, found)
    assert.are.equal("The provided URL '/v1/chat/completions' does not match the test model 'batch-test-model'.",
      rep.problems[1].message)
  end)

  it("each profile's limits: the older document's 1 MB lines, OpenAI's 200 MB files and 50,000 embedding inputs", function()
    local big = line("a", { model = "qwen-plus", messages = { { role = "user", content = ("x"):rep(2 * 1024 * 1024) } } })
    assert.are.same({}, (check({ big })))
    assert.are.same({ "line_too_large@1" }, (check({ big }, { limits = "dashscope-strict" })))
    local w = jsonl.writer({ path = dir .. "/strict.jsonl", limits = "dashscope-strict" })
    local ok, err = w:add("a", { model = "qwen-plus", messages = { { role = "user", content = ("x"):rep(2 * 1024 * 1024) } } })
    assert.is_nil(ok)
    assert.are.equal("line_too_large", err.code)
    local inputs = {}
    for i = 1, 30000 do inputs[i] = "w" end
    local emb = { line("a", { model = "text-embedding-3-small", input = inputs }, "/v1/embeddings"),
                  line("b", { model = "text-embedding-3-small", input = inputs }, "/v1/embeddings") }
    assert.are.same({ "too_many_inputs@2" }, (check(emb, { limits = "openai" })))
    assert.are.equal(200 * 1024 * 1024, require("lbatch.impl.api.service").profile("openai").max_bytes)
  end)
end)

describe("the emulator applies the service's limits", function()
  it("per API key, and the older document's numbers with --limits strict", function()
    local emu = H.emulator({ speed = 1, rate_limits = true })   -- (a rolling minute: see client_spec)
    local a = lbatch.new({ api_key = "key-a", base_url = emu.base, max_retries = 0 })
    local b = lbatch.new({ api_key = "key-b", base_url = emu.base, max_retries = 0 })
    local err
    for _ = 1, 101 do
      local p
      p, err = a:list_batches({ limit = 1 })
      if not p then break end
    end
    assert.are.equal(429, err.status)
    assert.is_truthy(b:list_batches({ limit = 1 }))      -- another account is not limited
    a:close() b:close()
    emu.stop()
  end)

  it("fails the lines of a model its region does not serve, as the service does", function()
    local emu = H.emulator({ speed = 200, rate_limits = false, region = "intl" })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local dir = H.tmpdir()
    local path = H.requests(dir .. "/r.jsonl", 2, { url = "/v1/chat/completions", model = "qwen3.8-max" })
    local f = assert(c:upload(path))
    local bt = assert(c:wait(assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id,
      { interval = 0.05 }))
    assert.are.equal("completed", bt.status)
    assert.are.same({ 0, 2 }, { bt.request_counts.completed, bt.request_counts.failed })
    local errs = assert(c:content(bt.error_file_id))
    local rec = cjson.decode(errs:match("[^\n]+"))
    assert.are.same({ 404, "model_not_found", "The provided model qwen3.8-max is not supported by the Batch API." },
      { rec.response.status_code, rec.error.code, rec.error.message })
    c:close()
    emu.stop()
  end)
end)
