-- Every endpoint OpenAI batches today (openai npm 6.49.0 resources/batches.d.ts,
-- BatchCreateParams.endpoint): each written by the writer, run by the
-- emulator over real HTTP and read back by the reader, with its content and
-- its tokens; and the batch object's usage and model against the lines' sum.
local H = require "helper"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local pipeline = require "lbatch.pipeline"
local report = require "lbatch.cmd.report"

describe("the endpoints OpenAI batches (openai dialect, over HTTP)", function()
  local emu, c, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false, dialect = "openai" })
    c = lbatch.new({ api_key = "k", base_url = emu.base, region = "openai", max_retries = 0 })
    dir = H.tmpdir()
  end)
  teardown(function() c:close() emu.stop() end)

  -- write two requests to `url`, run them, and read them back: the records by custom_id, and the batch
  local function run(url, bodies)
    local w = jsonl.writer({ path = dir .. "/" .. url:gsub("/", "_") .. ".jsonl", endpoint = url, limits = "openai" })
    for id, body in pairs(bodies) do assert(w:add(id, body)) end
    local m = assert(w:close())
    assert.are.equal(1, #m.files)
    local f = assert(c:upload(m.files[1].path))
    local b = assert(c:create({ input_file_id = f.id, endpoint = url }))
    b = assert(c:wait(b.id, { interval = 0.05 }))
    assert.are.equal("completed", b.status, url)
    local out = assert(c:content(b.output_file_id, { path = dir .. "/out" .. url:gsub("/", "_") .. ".jsonl" }))
    local recs = {}
    for rec, err in assert(results.open({ output = out, inputs = m.files[1].path })):each() do
      assert.is_truthy(rec, tostring(err))
      recs[rec.custom_id] = rec
    end
    return recs, b, out
  end

  it("/v1/responses: input required; the answer's output_text is the content, its input/output tokens counted",
    function()
      local recs, b, out = run("/v1/responses", { r1 = { model = "gpt-5-mini", input = "Say hi" } })
      local r = recs.r1
      assert.is_true(r.ok)
      assert.are.equal("Emulated answer (gpt-5-mini)", r.content)
      assert.are.equal(8, r.usage.input_tokens)
      local s = assert(assert(results.open({ output = out })):summary())
      assert.are.same({ 8, r.usage.output_tokens }, { s.prompt_tokens, s.completion_tokens })
      assert.are.equal("gpt-5-mini", b.model)
      -- the writer refuses a line without input, before anything is sent
      local w = jsonl.writer({ path = dir .. "/no-input.jsonl", endpoint = "/v1/responses", limits = "openai" })
      local ok, err = w:add("x", { model = "gpt-5-mini", instructions = "Say hi" })
      assert.is_nil(ok)
      assert.are.same({ "missing_field", "body.input" }, { err.code, err.param })
    end)

  it("/v1/images/generations: data as b64_json, or url when asked; the image tokens counted", function()
    local recs = run("/v1/images/generations", {
      a = { model = "gpt-image-1", prompt = "a red circle" },
      b = { model = "gpt-image-1", prompt = "a blue square", response_format = "url", n = 2 },
    })
    assert.is_true(recs.a.ok)
    assert.are.equal("iVBORw0KGgo", recs.a.content:sub(1, 11))   -- a PNG, in base64
    assert.are.equal(1, #recs.a.images)
    assert.are.equal(272, recs.a.usage.output_tokens)
    assert.are.equal(2, #recs.b.images)
    assert.truthy(recs.b.content:find("^https://"))
    assert.are.equal(544, recs.b.usage.output_tokens)
  end)

  it("/v1/images/edits: image and prompt required", function()
    local recs = run("/v1/images/edits", { e = { model = "gpt-image-1", prompt = "make it green",
                                                 image = "https://example.com/a.png" } })
    assert.is_true(recs.e.ok)
    assert.are.equal(1, #recs.e.images)
    -- the same shape twice (the C encoder's armed path) still checks the image
    local w = jsonl.writer({ path = dir .. "/edits.jsonl", endpoint = "/v1/images/edits", limits = "openai" })
    assert(w:add("1", { model = "gpt-image-1", prompt = "p", image = "https://example.com/a.png" }))
    assert(w:add("2", { model = "gpt-image-1", prompt = "p", image = "https://example.com/b.png" }))
    local ok, err = w:add("3", { model = "gpt-image-1", prompt = "p" })
    assert.is_nil(ok)
    assert.are.same({ "missing_field", "body.image" }, { err.code, err.param })
    assert(w:close())
  end)

  it("/v1/videos: the Video object is the record's video", function()
    local recs = run("/v1/videos", { v = { model = "sora-2", prompt = "a cat on a piano", seconds = "8" } })
    local v = recs.v
    assert.is_true(v.ok)
    assert.are.same({ "video", "completed", "8", "sora-2" }, { v.video.object, v.video.status, v.video.seconds,
                                                             v.video.model })
    assert.truthy(v.video.id:find("^video_"))
  end)

  it("summary takes the completed batch's usage and model; the lines' sum is kept, and differs on a partial file",
    function()
      local bodies = {}
      for i = 1, 4 do bodies["q" .. i] = { model = "gpt-5-mini", messages = { { role = "user", content = ("x"):rep(i * 40) } } } end
      local _, b, out = run("/v1/chat/completions", bodies)
      assert.are.equal("gpt-5-mini", b.model)
      assert.are.equal("table", type(b.usage))
      local s = assert(assert(results.open({ output = out })):summary({ batches = { b } }))
      assert.are.same({ "batch", false }, { s.usage_source, s.usage_differs })
      assert.are.same({ b.usage.input_tokens, b.usage.output_tokens, b.usage.total_tokens },
                      { s.prompt_tokens, s.completion_tokens, s.total_tokens })
      -- a results file that lost a line: the batch's usage is still the bill; the lines say less
      local lines = {}
      for l in io.lines(out) do lines[#lines + 1] = l end
      table.remove(lines)
      local part = H.write(dir .. "/partial.jsonl", table.concat(lines, "\n") .. "\n")
      s = assert(assert(results.open({ output = part })):summary({ batches = { b } }))
      assert.are.same({ "batch", true, 3 }, { s.usage_source, s.usage_differs, s.ok })
      assert.are.equal(b.usage.input_tokens, s.prompt_tokens)
      assert.is_true(s.lines_usage.prompt_tokens < s.prompt_tokens)
    end)

  it("a pipeline journals each batch's usage; the report and the run's summary read it", function()
    local reqs = {}
    for i = 1, 6 do
      reqs[i] = { custom_id = "p" .. i, body = { model = "gpt-5-mini", messages = { { role = "user", content = "n" .. i } } } }
    end
    local rep = assert(pipeline.run({ client = c, requests = reqs, dir = dir .. "/work", max_lines = 3,
                                      poll_interval = 0.05, limits = "openai" }))
    local want = 0
    for _, sh in ipairs(rep.shards) do
      assert.are.equal("table", type(sh.usage))
      want = want + sh.usage.total_tokens
    end
    local st = assert(report.read(dir .. "/work"))
    assert.are.same({ "batch", false, want }, { st.summary.usage_source, st.summary.usage_differs,
                                                st.summary.total_tokens })
  end)

  it("expires_after on upload and output_expires_after on create: sent, checked, and kept on the files", function()
    local w = jsonl.writer({ path = dir .. "/exp.jsonl", endpoint = "/v1/responses", limits = "openai" })
    assert(w:add("x", { model = "gpt-5-mini", input = "hi" }))
    local path = assert(w:close()).files[1].path
    local f = assert(c:upload(path, { expires_after = { anchor = "created_at", seconds = 7200 } }))
    assert.are.equal(f.created_at + 7200, f.expires_at)
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/responses",
                                output_expires_after = { anchor = "created_at", seconds = 3600 } }))
    b = assert(c:wait(b.id, { interval = 0.05 }))
    local out = assert(c:file(b.output_file_id))
    assert.are.equal(out.created_at + 3600, out.expires_at)
    -- without it: the provider's default (the emulator sets none)
    local b2 = assert(c:wait(assert(c:create({ input_file_id = f.id, endpoint = "/v1/responses" })).id,
                             { interval = 0.05 }))
    assert.is_nil(assert(c:file(b2.output_file_id)).expires_at)
    -- out of range: the service's 400, returned
    local no, err = c:create({ input_file_id = f.id, endpoint = "/v1/responses",
                               output_expires_after = { anchor = "created_at", seconds = 60 } })
    assert.is_nil(no)
    assert.are.same({ 400, "invalid_output_expires_after" }, { err.status, err.code })
    no, err = c:upload(path, { expires_after = { anchor = "created_at", seconds = 9999999 } })
    assert.is_nil(no)
    assert.are.equal("invalid_expires_after", err.code)
    -- not a table: a programming error
    assert.has_error(function() c:create({ input_file_id = f.id, endpoint = "/v1/responses",
                                           output_expires_after = 3600 }) end)
    assert.has_error(function() c:upload(path, { expires_after = "30d" }) end)
  end)

  it("the emulator fails a batch whose line lacks the endpoint's field (as the writer would refuse it)", function()
    local path = H.write(dir .. "/bad.jsonl",
      '{"custom_id":"a","method":"POST","url":"/v1/videos","body":{"model":"sora-2"}}\n')
    local f = assert(c:upload(path))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/videos" }))
    b = assert(c:wait(b.id, { interval = 0.05 }))
    assert.are.equal("failed", b.status)
    assert.are.same({ "missing_field", "body.prompt" }, { b.errors.data[1].code, b.errors.data[1].param })
  end)
end)
