-- One rules engine: the writer (its raw-line path `line` and `add`) and
-- `validate` report a bad line with the same code and the same message,
-- because lbatch.rules decides for both. Pure modules: no emulator.
local H = require "helper"
local jsonl = require "lbatch.jsonl"
local rules = require "lbatch.impl.formats.rules"
local cjson = require "cjson"

local CHAT, EMB, TESTURL = "/v1/chat/completions", "/v1/embeddings", "/v1/chat/ds-test"
local msgs = { { role = "user", content = "hi" } }

-- a line as the writer writes it
local function line(id, body, url)
  return '{"custom_id":' .. cjson.encode(id) .. ',"method":"POST","url":"' .. (url or CHAT) .. '","body":'
    .. cjson.encode(body or { model = "qwen-plus", messages = msgs }) .. "}"
end

local function req(t) return cjson.encode(t) end

local function prefix(id)
  return ("custom_id %s: "):format(id == nil and "(none)" or ("%q"):format(tostring(id)))
end

describe("the writer and validate", function()
  local dir, n
  before_each(function() dir, n = H.tmpdir(), 0 end)

  local function opts_of(o)
    o = o or {}
    return { limits = o.limits, endpoint = o.endpoint }
  end

  -- lines: a list, or a function that returns an iterator of them (50,001
  -- similar lines held at once would make Lua 5.1, whose string hash reads
  -- a few bytes of a long string, intern every new one through one chain)
  local function each(lines)
    if type(lines) == "function" then return lines() end
    local i = 0
    return function() i = i + 1 return lines[i] end
  end

  -- validate the lines; the problems of the last line (or of the file)
  local function validate(lines, o)
    n = n + 1
    local path = ("%s/v%d.jsonl"):format(dir, n)
    local f, count = assert(io.open(path, "wb")), 0
    for l in each(lines) do
      f:write(l, "\n")
      count = count + 1
    end
    f:close()
    local rep = assert(jsonl.validate(path, opts_of(o)))
    local last = {}
    for _, p in ipairs(rep.problems) do
      if p.line == count or p.line == nil then last[#last + 1] = p end
    end
    return last, rep
  end

  local function writer(o)
    o = o or {}
    n = n + 1
    return jsonl.writer({ path = ("%s/w%d.jsonl"):format(dir, n), limits = o.limits, endpoint = o.endpoint })
  end

  -- one bad line after some good ones: the writer's first refusal and
  -- validate's problem for that line agree
  -- (added: ids of good requests added before it, whose lines follow before's)
  local function agree(code, before, bad, o, add, added)
    o = o or {}
    local w = writer(o)
    for _, l in ipairs(before) do assert(w:line(l)) end
    local lines = {}
    for i, l in ipairs(before) do lines[i] = l end
    before = lines
    for _, id in ipairs(added or {}) do
      assert.is_true(w:add(id, { model = "qwen-plus", messages = msgs }))
      before[#before + 1] = line(id)
    end
    local ok, err
    if add then ok, err = add(w) else ok, err = w:line(bad) end
    w:close()
    assert.is_nil(ok, code .. ": the writer took it")
    local all = {}
    for i = 1, #before do all[i] = before[i] end
    all[#all + 1] = bad
    local probs = validate(all, o)
    assert.is_truthy(probs[1], code .. ": validate found nothing")
    assert.are.same({ code, code }, { err.code, probs[1].code })
    assert.are.equal(prefix(err.custom_id) .. probs[1].message, err.message)
    assert.are.equal("invalid", err.kind)
  end

  local good = line("g1")

  it("take a good line, and so does validate", function()
    local w = writer({})
    assert.is_true(w:line(good))
    assert.is_true(w:add("g2", { model = "qwen-plus", messages = msgs }))
    local m = w:close()
    assert.are.equal(2, m.lines)
    assert.is_true(jsonl.validate(m.files[1].path).ok)
    assert.are.equal(good, H.read(m.files[1].path):match("^[^\n]*"))   -- a raw line is written as it is
    local probs = validate({ good })
    assert.are.same({}, probs)
  end)

  local big = ("x"):rep(1024 * 1024 + 10)
  local inputs = {}
  for i = 1, 50001 do inputs[i] = "x" end

  -- code, lines before, the bad line, writer / validate options
  local raw = {
    { "invalid_json_line", {}, "{not json" },
    { "invalid_json_line", {}, "[1, 2]" },
    { "empty_line", { good }, "   " },
    { "invalid_utf8", {}, line("u", { model = "qwen-plus", messages = { { role = "user", content = "a\255b" } } }) },
    { "line_too_large", {}, line("big", { model = "qwen-plus", messages = { { role = "user", content = big } } }),
      { limits = "dashscope-strict" } },
    { "missing_custom_id", {}, req({ method = "POST", url = CHAT, body = { model = "qwen-plus", messages = msgs } }) },
    { "missing_custom_id", {}, req({ custom_id = 7, method = "POST", url = CHAT, body = { model = "qwen-plus", messages = msgs } }) },
    { "duplicate_custom_id", { good, line("g2") }, line("g1") },
    { "invalid_method", {}, req({ custom_id = "m", method = "GET", url = CHAT, body = { model = "qwen-plus", messages = msgs } }) },
    { "url_not_found", {}, line("u", nil, "/v1/nope") },
    { "url_mismatch", {}, line("u"), { endpoint = EMB } },
    { "invalid_body", {}, req({ custom_id = "b", method = "POST", url = CHAT, body = "text" }) },
    { "missing_model", {}, line("m", { messages = msgs }) },
    { "missing_field", {}, line("f", { model = "qwen-plus" }) },
    { "missing_field", {}, '{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus","messages":[]}}' },
    { "missing_field", {}, line("f", { model = "text-embedding-v4" }, EMB) },
    -- a required field written as JSON null is missing, not given
    { "missing_field", {}, '{"custom_id":"f","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus","messages":null}}' },
    { "missing_field", {}, '{"custom_id":"f","method":"POST","url":"/v1/embeddings","body":{"model":"text-embedding-v4","input":null}}' },
    { "model_endpoint_mismatch", {}, line("e", { model = "text-embedding-v4", messages = msgs }) },
    { "model_endpoint_mismatch", {}, line("e", { model = "qwen-plus", input = "x" }, EMB) },
    { "mismatched_test_url", {}, line("t", { model = "batch-test-model", messages = msgs }) },
    { "too_many_inputs", {}, line("i", { model = "text-embedding-3-small", input = inputs }, EMB), { limits = "openai" } },
    { "test_model_file_too_large", {}, line("t", { model = "batch-test-model", messages = { { role = "user", content = big } } }, TESTURL) },
  }

  it("refuse each bad raw line with validate's code and message", function()
    for _, c in ipairs(raw) do agree(c[1], c[2], c[3], c[4]) end
  end)

  -- add: the line validate reads is the one the writer would have written
  local added = {
    { "missing_custom_id", "", { model = "qwen-plus", messages = msgs } },
    { "url_not_found", "u", { model = "qwen-plus", messages = msgs }, "/v1/nope" },
    { "url_mismatch", "u", { model = "qwen-plus", messages = msgs }, CHAT, { endpoint = EMB } },
    { "missing_model", "m", { messages = msgs } },
    { "missing_field", "f", { model = "qwen-plus" } },
    { "missing_field", "f", { model = "qwen-plus", messages = cjson.null } },
    { "missing_field", "f", { model = "text-embedding-v4", input = cjson.null }, EMB },
    { "model_endpoint_mismatch", "e", { model = "text-embedding-v4", messages = msgs } },
    { "mismatched_test_url", "t", { model = "batch-test-model", messages = msgs }, CHAT },
    { "invalid_utf8", "u", { model = "qwen-plus", messages = { { role = "user", content = "ok \255" } } } },
    { "invalid_utf8", "id\255", { model = "qwen-plus", messages = msgs } },
    { "line_too_large", "big", { model = "qwen-plus", messages = { { role = "user", content = big } } }, nil,
      { limits = "dashscope-strict" } },
    { "too_many_inputs", "i", { model = "text-embedding-3-small", input = inputs }, EMB, { limits = "openai" } },
    { "test_model_file_too_large", "t", { model = "batch-test-model", messages = { { role = "user", content = big } } },
      TESTURL },
  }

  it("refuse each bad request of add with validate's code and message", function()
    for _, c in ipairs(added) do
      local code, id, body, url, o = c[1], c[2], c[3], c[4], c[5]
      agree(code, {}, line(id, body, url or (o and o.endpoint) or CHAT), o,
        function(w) return w:add(id, body, url) end)
    end
    agree("duplicate_custom_id", { good }, line("g1"), nil,
      function(w) return w:add("g1", { model = "qwen-plus", messages = msgs }) end)
  end)

  -- the same after a good request on the same route, so the C encoder's
  -- gate is armed (enc:arm): what it must not pass goes to the rules
  it("refuse each bad request of add after a good one on its route (the encoder's gate armed)", function()
    local after = {
      { "missing_field", "f", { model = "qwen-plus", messages = {} } },
      { "missing_field", "f", { model = "qwen-plus", messages = cjson.null } },
      { "missing_field", "f", { model = "qwen-plus", messages = "hi" } },
      { "duplicate_custom_id", "g0", { model = "qwen-plus", messages = msgs } },
      { "duplicate_custom_id", "g2", { model = "qwen-plus", messages = msgs }, CHAT },
      { "line_too_large", "big", { model = "qwen-plus", messages = { { role = "user", content = big } } }, nil,
        { limits = "dashscope-strict" } },
    }
    for _, c in ipairs(added) do
      -- (another model would shard: validate fails that file as a whole)
      local same = c[3].model == nil or c[3].model == "qwen-plus"
      if same and (c[4] == nil or c[4] == CHAT) and not (c[5] and c[5].endpoint) then after[#after + 1] = c end
    end
    for _, c in ipairs(after) do
      local code, id, body, url, o = c[1], c[2], c[3], c[4], c[5]
      -- g1 arms the gate, g2 goes through it
      agree(code, { line("g0") }, line(id, body, url or CHAT), o, function(w) return w:add(id, body, url) end,
        { "g1", "g2" })
    end
    local w = writer({})
    assert(w:add("t0", { model = "batch-test-model", messages = msgs }, TESTURL))
    local ok, err = w:add("t1", { model = "batch-test-model", messages = { { role = "user", content = big } } }, TESTURL)
    w:close()
    assert.is_nil(ok)
    assert.are.equal("test_model_file_too_large", err.code)
  end)

  -- openai npm 6.49.0: BatchCreateParams.endpoint, and each endpoint's params
  it("the endpoints OpenAI batches today: each one's fields, the writer and validate agree", function()
    local OA = { limits = "openai" }
    local IG, IE, V, R = "/v1/images/generations", "/v1/images/edits", "/v1/videos", "/v1/responses"
    local fine = {
      { IG, { model = "gpt-image-1", prompt = "a cat" } },
      { IE, { model = "gpt-image-1", prompt = "greener", image = "https://example.com/a.png" } },
      { V, { model = "sora-2", prompt = "a cat" } },
      { R, { model = "gpt-5-mini", input = "hi" } },
      { R, { model = "gpt-5-mini", input = { { role = "user", content = "hi" } } } },
    }
    for _, c in ipairs(fine) do
      local l = line("ok", c[2], c[1])
      assert.are.same({}, validate({ l }, OA), c[1])
      local w = writer(OA)
      assert.is_true(w:add("ok", c[2], c[1]))
      assert.is_true(w:add("ok2", c[2], c[1]))      -- the second one through the armed gate
      w:close()
    end
    local bad = {
      { "missing_field", "body.prompt", IG, { model = "gpt-image-1" } },
      { "missing_field", "body.prompt", IE, { model = "gpt-image-1", image = "https://example.com/a.png" } },
      { "missing_field", "body.image", IE, { model = "gpt-image-1", prompt = "greener" } },
      { "missing_field", "body.image", IE, { model = "gpt-image-1", prompt = "greener", image = cjson.null } },
      { "missing_field", "body.prompt", V, { model = "sora-2", seconds = "4" } },
      { "missing_field", "body.input", R, { model = "gpt-5-mini", instructions = "hi" } },
      { "missing_model", "body.model", R, { input = "hi" } },
      { "missing_model", "body.model", IG, { prompt = "a cat" } },
    }
    for _, c in ipairs(bad) do
      local code, param, url, body = c[1], c[2], c[3], c[4]
      agree(code, {}, line("b", body, url), OA, function(w) return w:add("b", body, url) end)
      local probs = validate({ line("b", body, url) }, OA)
      assert.are.equal(param, probs[1].param, url)
      -- after a good line of the same shape (the encoder's gate armed, where the endpoint lets it)
      local w = writer(OA)
      local good_body = {}
      for _, f in ipairs(fine) do if f[1] == url and (body.model == nil or f[2].model == body.model) then good_body = f[2] end end
      if body.model ~= nil then
        assert.is_true(w:add("g1", good_body, url))
        assert.is_true(w:add("g2", good_body, url))
        local ok, err = w:add("b", body, url)
        assert.is_nil(ok, url .. " " .. param)
        assert.are.same({ code, param }, { err.code, err.param })
      end
      w:close()
    end
    -- DashScope batches none of them
    for _, c in ipairs(fine) do
      assert.are.equal("url_not_found", validate({ line("d", c[2], c[1]) })[1].code)
    end
  end)

  -- file-level rules: validate fails the file; the writer starts a new one,
  -- and every file it writes passes validate
  local function shards(code, lines, o)
    local probs = validate(lines, o)
    local codes = {}
    for _, p in ipairs(probs) do codes[#codes + 1] = p.code end
    assert.is_truthy(table.concat(codes, " "):find(code, 1, true), code .. " not in " .. table.concat(codes, " "))
    local w = writer(o or {})
    for l in each(lines) do assert(w:line(l)) end
    local m = w:close()
    assert.is_true(#m.files > 1, code)
    for _, f in ipairs(m.files) do
      local rep = jsonl.validate(f.path, opts_of(o or {}))
      assert.is_true(rep.ok, code .. ": " .. f.path)
    end
    return m
  end

  it("shard where validate fails a file: model, thinking mode, too many lines, test-model lines", function()
    shards("model_mismatch", { line("a"), line("b", { model = "qwen-max", messages = msgs }) })
    shards("mismatched_thinking",
      { line("a"), line("b", { model = "qwen-plus", enable_thinking = true, messages = msgs }) })
    local tests = {}
    for i = 1, 101 do tests[i] = line("t" .. i, { model = "batch-test-model", messages = msgs }, TESTURL) end
    shards("test_model_too_many_lines", tests)
    local function many()
      local i = 0
      return function()
        i = i + 1
        if i <= 50001 then return line("r" .. i) end
      end
    end
    local m = shards("too_many_tasks", many)
    assert.are.same({ 50000, 1 }, { m.files[1].lines, m.files[2].lines })
  end)

  it("a request that is not a table is one problem, added to those already found", function()
    local chk = rules.checker()
    local out = chk:request(3, "a string")
    assert.are.same({ { "invalid_json_line", 3 } }, { { out[1].code, out[1].line } })
    assert.are.equal(1, #out)
    chk:request(4, 42, out)
    assert.are.same({ 2, "invalid_json_line", 4 }, { #out, out[2].code, out[2].line })
  end)

  it("share the file-size rule: the checker fails a file over max_bytes, the writer shards there", function()
    local chk = rules.checker({ max_bytes = 300 })
    local probs, bytes = {}, 0
    for i = 1, 5 do
      local l = line("s" .. i)
      bytes = bytes + #l + 1
      chk:line(i, l, #l + 1, probs)
    end
    chk:finish(probs)
    assert.are.same({ "file_too_large" }, { probs[1] and probs[1].code })
    assert.are.equal(select(2, rules.rule.file_size(bytes, 300)), probs[1].message)
    local w = jsonl.writer({ path = dir .. "/fs.jsonl", max_bytes = 300 })
    for i = 1, 5 do assert(w:line(line("s" .. i))) end
    local m = w:close()
    assert.is_true(#m.files > 1)
    for _, f in ipairs(m.files) do assert.is_true(f.bytes <= 300) end
  end)
end)
