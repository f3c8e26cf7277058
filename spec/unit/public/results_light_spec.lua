-- The results reader's light records (lbatch/core/rec.c scans a line for
-- what a record needs; the body is decoded when first read) held against
-- the records a whole lua-cjson decode makes (results.record), over a
-- corpus of real and odd result lines and over random ones.
local H = require "helper"
local cjson = require "cjson"
local core = require "lbatch.core"
local results = require "lbatch.results"

local FIELDS = { "custom_id", "id", "ok", "class", "status_code", "request_id", "body", "model", "created",
                 "usage", "content", "reasoning", "embedding", "error_code", "error_type", "error_message" }

-- (an error field made of a table is its tostring: an address, different in each decode)
local function addr(v) return type(v) == "string" and v:match("^table: ") and "table" or v end

local function same(light, full, what)
  for _, k in ipairs(FIELDS) do
    assert.are.same(addr(full[k]), addr(light[k]), what .. ": " .. k)
    assert.are.equal(math.type and math.type(full[k]) or type(full[k]),
                     math.type and math.type(light[k]) or type(light[k]), what .. ": the type of " .. k)
  end
end

local ok_line = '{"id":"batch_req_1","custom_id":"r1","response":{"status_code":200,"request_id":"req-1","body":'
  .. '{"id":"chatcmpl-1","object":"chat.completion","created":1711475054,"model":"qwen-plus","choices":[{"index":0,'
  .. '"finish_reason":"stop","message":{"role":"assistant","content":"The answer is 4."}}],'
  .. '"usage":{"prompt_tokens":24,"completion_tokens":15,"total_tokens":39}}},"error":null}'

local function answer(content, extra)
  return ('{"custom_id":"c","response":{"status_code":200,"body":{"model":"m","choices":[{"message":{"content":%s%s}}]}}}')
    :format(content, extra or "")
end

-- lines the scanner takes (true) or leaves to lua-cjson (false)
local corpus = {
  { ok_line, true },
  { answer('"line\\nbreak \\"quoted\\" back\\\\slash \\/ \\b\\f\\r\\t"'), true },
  { answer('"\\u4e2d\\u6587 \\u00e9 \\ud83d\\ude00 \\u0000 end"'), true },
  { answer('"中文 raw é 😀"', ',"reasoning_content":"think \\n hard"'), true },
  { answer('null'), true },
  { answer('"x"', ',"reasoning_content":null'), true },
  { '{"custom_id":"e","response":{"status_code":200,"body":{"object":"list","data":[{"embedding":[0.1,-2,3e-5,0,-0],'
    .. '"index":0}],"model":"text-embedding-v4","usage":{"prompt_tokens":3,"total_tokens":3}}}}', true },
  { '{"id":"b","custom_id":"f","response":{"status_code":400,"request_id":"q","body":{"error":{"code":"invalid_parameter",'
    .. '"message":"bad request","type":"invalid_request_error"}}},"error":{"code":"invalid_parameter","message":"bad"}}', true },
  { '{"custom_id":"g","response":{"status_code":500,"body":{"error":{"message":"oops","type":"server_error"}}},"error":null}', true },
  { '{"custom_id":"h","response":null,"error":{"code":"batch_expired","message":"expired"}}', true },
  { '{"custom_id":"i","response":{"status_code":200,"body":{}}}', true },
  { '{"custom_id":"j","response":{"status_code":200,"body":{"error":null,"x":null}}}', true },
  { '{"custom_id":"k","response":{"status_code":200,"body":{"usage":{"prompt_tokens":1,"completion_tokens_details":'
    .. '{"reasoning_tokens":7},"x":null,"cached":1.5}}}}', true },
  { '  {"custom_id":"l","response":{"status_code":2e2,"body":{"a":1,"created":1.0e3}}}  \r', true },
  { '{"custom_id":"m","custom_id":"m2","response":{"status_code":201.5,"body":{"a":[1,{"b":[[]]}],"model":"x"}}}', true },
  { '{"custom_id":"n","response":{"status_code":429,"body":{"error":{"code":429,"message":"slow"}}}}', true },
  { '{"custom_id":"o","response":{"status_code":200,"body":{"choices":[{"message":{"content":"a"}},{"message":1}]}}}', true },
  { '{"custom_id":"p","response":{"status_code":200,"body":{"choices":"none","data":7,"usage":"u"}}}', true },
  { '{"custom_id":"q","response":{"status_code":200,"body":{"data":[{"embedding":false}]}}}', true },
  { '{"custom_id":"big","response":{"status_code":200,"body":{"created":12345678901234567890,"n":-0.0}}}', true },
  -- left to lua-cjson
  { '{"custom_id":7,"response":{"status_code":200,"body":{"a":1}}}', false },
  { answer('[{"type":"text","text":"parts"}]'), false },
  { '{"custom_id":"r","response":{"status_code":200,"body":{"a":1}},"response":{"status_code":500}}', false },
  { '{"custom_id":"s","response":{"status_code":200,"body":{"data":[{"embedding":[1,null]}]}}}', false },
  { answer('"\\ud800 lone"'), false },
  { answer('"bad \\x escape"'), false },
  { '{"custom_id":"t","response":{"status_code":200,"body":{"a":1}}} trailing', false },
  { '{"custom_id":"u","response":{"status_code":+200}}', false },
  { '{"custom_id":"v","response":{"status_code":"200","body":{"a":1}}}', false },
  { '{"custom_id":"w","response":[1]}', false },
  { '{"custom_\\u0069d":"x","response":{"status_code":200,"body":{"a":1}}}', false },
  { '[1,2]', false }, { 'not json', false }, { '', false }, { '{"a":', false },
  { '{"custom_id":"y","error":"just a string"}', false },
  { ('{"a":'):rep(300) .. "1" .. ("}"):rep(300), false },
}

describe("light records", function()
  it("hold what a whole decode holds, over the corpus", function()
    for i, case in ipairs(corpus) do
      local line, taken = case[1], case[2]
      assert.are.equal(taken, core.result(line) ~= false, "case " .. i .. " taken")
      same(results.light(line), results.record(line), "case " .. i)
    end
  end)

  it("decode the body only when it is read", function()
    local rec = results.light(ok_line)
    assert.are.equal("r1", rec.custom_id)
    assert.is_true(rec.ok)
    assert.are.equal("The answer is 4.", rec.content)
    assert.are.equal(39, rec.usage.total_tokens)
    assert.is_nil(rawget(rec, "body"))
    assert.are.equal("chat.completion", rec.body.object)
    assert.is_not_nil(rawget(rec, "body"))
    assert.are.same(results.record(ok_line).body, rec.body)
  end)

  it("hold what a whole decode holds, over random lines", function()
    local seed = 3
    local function rnd(n) seed = (seed * 1103515245 + 12345) % 2147483648 return seed % n + 1 end
    local null = cjson.null
    local function pick(...) local t = { ... } return t[rnd(select("#", ...))] end
    local function scalar()
      return pick("s", "中\n\"", 0, -1, 2.5, 200, 1e20, true, false, null, {}, { 1, 2 }, { a = null, b = "x" })
    end
    for i = 1, 4000 do
      local msg = pick({ content = scalar(), reasoning_content = scalar(), role = "assistant" }, scalar())
      local body = pick({
        model = pick("qwen-plus", scalar()), created = pick(1711475054, scalar()),
        choices = pick({ { message = msg } }, { msg }, scalar(), {}),
        data = pick({ { embedding = pick({ 0.5, -1, 0 }, scalar()) } }, scalar()),
        usage = pick({ prompt_tokens = 1, total_tokens = pick(3, null), details = { r = 1 } }, scalar()),
        error = pick(null, { code = pick("c", 500, null), message = scalar(), type = pick("t", null) }, scalar()),
      }, scalar())
      local r = { custom_id = pick("id" .. i, scalar()), id = pick("b", scalar()),
                  response = pick({ status_code = pick(200, 204, 400, 500, 299.5, scalar()), request_id = scalar(),
                                    body = body }, scalar()),
                  error = pick(null, { code = pick("rate_limit_exceeded", scalar()), message = "m" }, scalar()) }
      local line = cjson.encode(r)
      same(results.light(line), results.record(line), "line " .. line)
    end
  end)

  it("come out of the reader and the join, equal to whole decodes", function()
    local dir = H.tmpdir()
    local lines = {}
    for i, case in ipairs(corpus) do
      if case[2] and not case[1]:find("^%s") then lines[#lines + 1] = case[1] end
      if i == 1 then lines[#lines + 1] = "" end
    end
    H.write(dir .. "/out.jsonl", table.concat(lines, "\n") .. "\n")
    local n = 0
    for rec in assert(results.open({ output = dir .. "/out.jsonl" })):each() do
      n = n + 1
      local line = lines[n] == "" and lines[n + 1] or lines[n]
      if lines[n] == "" then table.remove(lines, n) end
      same(rec, results.record(line), "record " .. n)
    end
    assert.are.equal(#lines, n)
    H.write(dir .. "/in.jsonl", '{"custom_id":"r1","method":"POST","url":"/v1/chat/completions","body":{"model":"m",'
      .. '"messages":[{"role":"user","content":"q"}]}}\n')
    local joined = {}
    for rec in assert(results.open({ output = dir .. "/out.jsonl", inputs = dir .. "/in.jsonl" })):each() do
      joined[#joined + 1] = rec
    end
    assert.are.equal(1, #joined)
    same(joined[1], results.record(ok_line), "joined")
    assert.are.equal("q", joined[1].prompt)
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("of a line over 4 KB with escapes (unescaped in a buffer the collector owns) equal whole decodes", function()
    local content = string.rep('caf\195\169 "q"\n\\ \240\159\152\128 ', 600)
    local line = cjson.encode({ id = "x", custom_id = "a", response = { status_code = 200,
      body = { choices = { { message = { content = content } } }, usage = { prompt_tokens = 1 } } }, error = cjson.null })
    assert.is_true(#line > 4096)
    same(results.light(line), results.record(line), "light")
    local dir = H.tmpdir()
    H.write(dir .. "/in.jsonl", '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n')
    H.write(dir .. "/out.jsonl", line .. "\n")
    for _, opts in ipairs({ {}, { fields = { "content", "usage" } } }) do
      local n = 0
      for rec, err in assert(results.open({ output = dir .. "/out.jsonl", inputs = dir .. "/in.jsonl" })):each(opts) do
        assert.is_truthy(rec, tostring(err))
        assert.are.equal(content, rec.content)
        assert.are.same({ prompt_tokens = 1 }, rec.usage)
        n = n + 1
      end
      assert.are.equal(1, n)
    end
    os.execute("rm -rf '" .. dir .. "'")
  end)

  it("hold only their fields: pairs and cjson.encode see what a whole decode has", function()
    local rec = results.light(ok_line)
    for k in pairs(rec) do assert.are.equal("string", type(k), "a key of the record") end
    local _ = rec.body
    local back = require("lbatch.json").normalize(cjson.decode(cjson.encode(rec)))
    same(back, results.record(ok_line), "encoded")
  end)
end)
