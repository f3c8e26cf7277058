-- The request-file writer, validate() and the multimodal helpers, on real files.
local H = require "helper"
local jsonl = require "lbatch.jsonl"
local json = require "lbatch.json"
local cjson = require "cjson"

local function read_lines(path)
  local out = {}
  for l in io.lines(path) do out[#out + 1] = l end
  return out
end

describe("jsonl writer", function()
  local dir
  before_each(function() dir = H.tmpdir() end)

  it("writes one request per line in the service's shape", function()
    local w = jsonl.writer({ path = dir .. "/r.jsonl", model = "qwen-plus" })
    assert.is_true(w:chat("a", { prompt = "2 + 2 = ?", system = "Be brief.", temperature = 0.2 }))
    assert.is_true(w:add("b", { model = "qwen-plus", messages = { { role = "user", content = "hi" } } }))
    local m = w:close()
    assert.are.equal(1, #m.files)
    assert.are.same({ path = dir .. "/r.jsonl", lines = 2, bytes = #H.read(dir .. "/r.jsonl"),
                      model = "qwen-plus", endpoint = "/v1/chat/completions" }, m.files[1])
    local first = cjson.decode(read_lines(dir .. "/r.jsonl")[1])
    assert.are.same({ custom_id = "a", method = "POST", url = "/v1/chat/completions", body = {
      model = "qwen-plus", temperature = 0.2,
      messages = { { role = "system", content = "Be brief." }, { role = "user", content = "2 + 2 = ?" } } } }, first)
  end)

  it("keeps empty arrays and objects, and integers as integers", function()
    local w = jsonl.writer({ path = dir .. "/e.jsonl", model = "m" })
    assert.is_true(w:chat("a", { prompt = "x", tools = json.empty_array, stop = json.array({}),
                                 extra = {}, max_tokens = 1024, seed = 42, top_p = 0.8 }))
    w:close()
    local line = read_lines(dir .. "/e.jsonl")[1]
    assert.matches('"tools":%[%]', line)
    assert.matches('"stop":%[%]', line)
    assert.matches('"extra":{}', line)
    assert.matches('"max_tokens":1024[,}]', line)
    assert.matches('"seed":42[,}]', line)
    assert.matches('"top_p":0.8[,}]', line)
  end)

  local msgs = { { role = "user", content = "hi" } }

  it("refuses each broken request with its custom_id and the rule", function()
    local w = jsonl.writer({ path = dir .. "/b.jsonl", model = "qwen-plus" })
    assert.is_true(w:chat("dup", { prompt = "x" }))
    local cases = {
      { function() return w:chat("dup", { prompt = "y" }) end, "duplicate_custom_id", "dup" },
      { function() return w:chat("", { prompt = "y" }) end, "missing_custom_id", "" },
      { function() return w:add("nomodel", { messages = {} }) end, "missing_model", "nomodel" },
      { function() return w:add("fn", { model = "m", messages = msgs, f = print }) end, "invalid_body", "fn" },
      { function() return w:add("big", { model = "m", messages = msgs, x = ("z"):rep(6 * 1024 * 1024) }) end,
        "line_too_large", "big" },
      { function() return w:add("nomsg", { model = "m" }) end, "missing_field", "nomsg" },
      { function() return w:add("emb", { model = "text-embedding-v4", messages = msgs }) end,
        "model_endpoint_mismatch", "emb" },
      { function() return w:add("utf", { model = "m", messages = { { role = "user", content = "a\255b" } } }) end,
        "invalid_utf8", "utf" },
      { function() return w:add("url", { model = "m" }, "/v1/completions") end, "url_not_found", "url" },
      { function() return w:add("tm", { model = "batch-test-model" }, "/v1/chat/completions") end, "mismatched_test_url", "tm" },
      { function() return w:request({ custom_id = "get", method = "GET", url = "/v1/chat/completions", body = { model = "m" } }) end,
        "invalid_method", "get" },
    }
    for i, c in ipairs(cases) do
      local ok, err = c[1]()
      assert.is_nil(ok, "case " .. i)
      assert.are.same({ "invalid", c[2], c[3] }, { err.kind, err.code, err.custom_id }, "case " .. i)
      assert.matches(("custom_id %q"):format(c[3]):gsub("%p", "%%%0"), tostring(err))
    end
    local fixed = jsonl.writer({ path = dir .. "/f.jsonl", endpoint = "/v1/embeddings" })
    local ok, err = fixed:add("c", { model = "m" }, "/v1/chat/completions")
    assert.is_nil(ok)
    assert.are.equal("url_mismatch", err.code)
    fixed:close()
    assert.has_error(function() w:add("x", "not a table") end)
    assert.has_error(function() w:add({}, { model = "m" }) end)
    -- a programming error names the caller's line (add is a C function)
    local _, raised = pcall(function() w:add("x", "not a table") end)
    assert.matches("^spec/unit/public/jsonl_spec%.lua:%d+: lbatch%.jsonl%.add: body must be a table", raised)
    assert.has_error(function() jsonl.writer({}) end)
    w:close()
    assert.are.equal(1, #read_lines(dir .. "/b.jsonl"))   -- nothing refused was written
  end)

  it("shards at the line limit and at the byte limit", function()
    local w = jsonl.writer({ path = dir .. "/s.jsonl", model = "m", max_lines = 4 })
    for i = 1, 10 do assert.is_true(w:chat("q" .. i, { prompt = "p" })) end
    local m = w:close()
    assert.are.same({ 4, 4, 2 }, { m.files[1].lines, m.files[2].lines, m.files[3].lines })
    assert.are.same({ dir .. "/s.jsonl", dir .. "/s-2.jsonl", dir .. "/s-3.jsonl" },
                    { m.files[1].path, m.files[2].path, m.files[3].path })
    local wb = jsonl.writer({ path = dir .. "/sb.jsonl", model = "m", max_bytes = 1000 })
    for i = 1, 30 do assert.is_true(wb:chat(("q%02d"):format(i), { prompt = ("x"):rep(50) })) end
    local mb = wb:close()
    assert.is_true(#mb.files > 1)
    local total = 0
    for _, f in ipairs(mb.files) do
      assert.is_true(f.bytes <= 1000)
      assert.are.equal(f.bytes, #H.read(f.path))
      total = total + f.lines
    end
    assert.are.equal(30, total)
  end)

  it("puts different models and thinking modes in different files", function()
    local w = jsonl.writer({ path = dir .. "/m.jsonl" })
    assert.is_true(w:chat("a", { model = "qwen-plus", prompt = "x" }))
    assert.is_true(w:chat("b", { model = "qwen-max", prompt = "x" }))
    assert.is_true(w:chat("c", { model = "qwen-plus", prompt = "x", enable_thinking = true }))
    assert.is_true(w:chat("d", { model = "qwen-plus", prompt = "x" }))
    assert.is_true(w:test("e", "hello"))
    assert.is_true(w:embedding("f", { model = "text-embedding-v4", input = "x" }))
    local m = w:close()
    assert.are.equal(5, #m.files)
    assert.are.same({ 2, "qwen-plus" }, { m.files[1].lines, m.files[1].model })
    assert.are.same({ "batch-test-model", "/v1/chat/ds-test" }, { m.files[4].model, m.files[4].endpoint })
    assert.are.same({ "text-embedding-v4", "/v1/embeddings" }, { m.files[5].model, m.files[5].endpoint })
    for _, f in ipairs(m.files) do assert.is_true(jsonl.validate(f.path).ok, f.path) end
  end)

  it("keeps test-model files to 100 lines", function()
    local w = jsonl.writer({ path = dir .. "/t.jsonl" })
    for i = 1, 150 do assert.is_true(w:test("t" .. i)) end
    local m = w:close()
    assert.are.same({ 100, 50 }, { m.files[1].lines, m.files[2].lines })
  end)

  it("starts a new file after 50,000 lines, at constant memory", function()
    collectgarbage()
    local before = collectgarbage("count")
    local w = jsonl.writer({ path = dir .. "/big.jsonl", model = "m" })
    for i = 1, 50001 do w:chat("r" .. i, { prompt = "p" }) end
    local m = w:close()
    assert.are.same({ 50000, 1 }, { m.files[1].lines, m.files[2].lines })
    collectgarbage()
    assert.is_true(collectgarbage("count") - before < 2048)  -- the custom_id sets went with their files
    assert.is_true(jsonl.validate(m.files[1].path).ok)
  end)
end)

describe("jsonl.validate", function()
  local dir
  before_each(function() dir = H.tmpdir() end)

  local function line(id, extra, body)
    local req = { custom_id = id, method = "POST", url = "/v1/chat/completions",
                  body = body or { model = "qwen-plus", messages = { { role = "user", content = "hi" } } } }
    for k, v in pairs(extra or {}) do req[k] = v end
    return cjson.encode(req)
  end

  local function problems(lines, opts)
    local path = H.write(dir .. "/v.jsonl", table.concat(lines, "\n") .. (#lines > 0 and "\n" or ""))
    local rep = assert(jsonl.validate(path, opts))
    local found = {}
    for _, p in ipairs(rep.problems) do found[#found + 1] = p.code .. "@" .. tostring(p.line) end
    return found, rep
  end

  local msgs = { { role = "user", content = "hi" } }

  it("names every problem with its line number", function()
    local found, rep = problems({
      line("a"),                                                             -- 1 fine
      "{broken",                                                             -- 2
      cjson.encode({ method = "POST", url = "/v1/chat/completions", body = { model = "qwen-plus", messages = msgs } }), -- 3
      line("a"),                                                             -- 4
      line("m", { method = "PUT" }),                                         -- 5
      line("u", { url = "/v1/chat/ds-test" }),                               -- 6
      line("x", nil, { model = "qwen-max", messages = msgs }),               -- 7
      line("t", nil, { model = "qwen-plus", enable_thinking = true, messages = msgs }), -- 8
      "",                                                                    -- 9
      line("nb", { body = "text" }),                                         -- 10
      line("nm", nil, { messages = msgs }),                                  -- 11
    })
    assert.is_false(rep.ok)
    assert.are.same({ "invalid_json_line@2", "missing_custom_id@3", "duplicate_custom_id@4", "invalid_method@5",
                      "url_mismatch@6", "model_mismatch@7", "mismatched_thinking@8", "empty_line@9",
                      "invalid_body@10", "missing_model@11" }, found)
    assert.are.same({ 11, "qwen-plus", "/v1/chat/completions" }, { rep.lines, rep.model, rep.endpoint })
  end)

  it("checks the batch endpoint when given", function()
    local found = problems({ line("a") }, { endpoint = "/v1/embeddings" })
    assert.are.same({ "url_mismatch@1" }, found)
  end)

  it("validate closes the file it reads, without waiting for the collector", function()
    local path = dir .. "/closed.jsonl"
    local f = assert(io.open(path, "wb"))
    f:write(line("a"), "\n")
    f:close()
    local left = H.files_left_open(function()
      for _ = 1, 50 do assert.is_true(jsonl.validate(path).ok) end
    end)
    assert.is_true(left < 5, left .. " more files open after 50 validations")
  end)

  it("reports an empty file, a line over 6 MB and more than 50,000 lines", function()
    assert.are.same({ "empty_file@nil" }, (problems({})))
    local big = line("big", nil, { model = "qwen-plus", messages = { { role = "user", content = ("x"):rep(6 * 1024 * 1024) } } })
    assert.are.same({ "line_too_large@2" }, (problems({ line("a"), big, line("b") })))
    local path = dir .. "/many.jsonl"
    local f = assert(io.open(path, "wb"))
    for i = 1, 50002 do f:write(line("r" .. i), "\n") end
    f:close()
    local rep = jsonl.validate(path)
    assert.are.equal(1, #rep.problems)
    assert.are.same({ "too_many_tasks", 50001 }, { rep.problems[1].code, rep.problems[1].line })
    rep = jsonl.validate(path, { limits = "openai" })        -- OpenAI's limit is 50,000 requests too
    assert.are.same({ "too_many_tasks", 50001 }, { rep.problems[1].code, rep.problems[1].line })
  end)

  it("applies the test-model rules", function()
    local t = { model = "batch-test-model", messages = { { role = "user", content = "x" } } }
    assert.are.same({ "mismatched_test_url@1" }, (problems({ line("a", nil, t) })))
    local lines = {}
    for i = 1, 101 do lines[i] = line("t" .. i, { url = "/v1/chat/ds-test" }, t) end
    assert.are.same({ "test_model_too_many_lines@nil" }, (problems(lines)))
    local fat = { model = "batch-test-model", messages = { { role = "user", content = ("y"):rep(30000) } } }
    lines = {}
    for i = 1, 40 do lines[i] = line("f" .. i, { url = "/v1/chat/ds-test" }, fat) end
    assert.are.same({ "test_model_file_too_large@nil" }, (problems(lines)))
  end)

  it("fails cleanly on a missing file", function()
    local rep, err = jsonl.validate(dir .. "/nope.jsonl")
    assert.is_nil(rep)
    assert.are.same({ "io", false }, { err.kind, err.retryable })
    assert.matches("nope.jsonl", err.message)
  end)
end)

describe("multimodal helpers", function()
  it("turns a local image into a data: URL and passes URLs through", function()
    local dir = H.tmpdir()
    local png = H.write(dir .. "/frame.bin", "\137PNG\r\n\26\n" .. ("\0"):rep(20))
    local url = jsonl.data_url(png)
    assert.matches("^data:image/png;base64,", url)
    assert.are.equal("iVBORw0KGgo", url:match("base64,(.*)"):sub(1, 11))
    local jpg = H.write(dir .. "/photo.jpg", "\255\216\255\224rest")
    assert.matches("^data:image/jpeg;base64,", jsonl.data_url(jpg))
    assert.are.equal("https://example.com/a.png", jsonl.data_url("https://example.com/a.png"))
    assert.are.equal("YW55IGNhcm5hbCBwbGVhc3U=", jsonl.base64("any carnal pleasu"))
    local w = jsonl.writer({ path = dir .. "/vl.jsonl", model = "qwen-vl-plus" })
    assert.is_true(w:chat("img", { prompt = "What is this?", images = { png, "https://example.com/b.jpg" } }))
    local ok, err = w:chat("gone", { prompt = "x", images = { dir .. "/missing.png" } })
    assert.is_nil(ok)
    assert.are.same({ "io", "gone", "images" }, { err.kind, err.custom_id, err.param })
    assert.matches('^custom_id "gone": cannot read .*missing.png', err.message)
    w:close()
    local req = cjson.decode(H.read(dir .. "/vl.jsonl"))
    local content = req.body.messages[1].content
    assert.are.same({ "text", "image_url", "image_url" }, { content[1].type, content[2].type, content[3].type })
    assert.are.equal("https://example.com/b.jpg", content[3].image_url.url)
  end)
end)
