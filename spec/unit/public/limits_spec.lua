-- Every limit at exactly the limit, one under and one over: the line's
-- bytes (its newline not counted), the lines of a file, the test model's
-- lines and bytes, the writer's shards (lines and bytes), the embedding
-- inputs, and the results reader's chunks (its last line, its last chunk).
-- A limit compared one off is the bug a user meets first: a file the
-- service takes refused, or one it refuses sent.
local H = require "helper"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local service = require "lbatch.impl.api.service"
local cjson = require "cjson"

local PRE = '{"custom_id":"%s","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
  .. '"messages":[{"role":"user","content":"'
local POST = '"}]}}'

-- a request line of exactly `size` bytes (its newline not counted)
local function line_of(size, id)
  local head = PRE:format(id or "x")
  return head .. ("a"):rep(size - #head - #POST) .. POST
end

local function codes(rep)
  local t = {}
  for _, p in ipairs(rep.problems) do t[#t + 1] = p.code end
  return table.concat(t, ",")
end

describe("limits", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  it("a line: exactly max_line_bytes is taken, one more is refused; the newline does not count", function()
    local max = service.profile("dashscope-strict").max_line_bytes
    for _, case in ipairs({ { max - 1, "" }, { max, "" }, { max + 1, "line_too_large" } }) do
      local text = line_of(case[1])
      assert.are.equal(case[1], #text)
      for _, eol in ipairs({ "\n", "" }) do                 -- also as the last line, without its newline
        local rep = assert(jsonl.validate(H.write(dir .. "/l.jsonl", text .. eol), { limits = "dashscope-strict" }))
        assert.are.equal(case[2], codes(rep), case[1] .. " bytes")
      end
      local w = jsonl.writer({ path = dir .. "/w.jsonl", limits = "dashscope-strict" })
      local ok, err = w:line(text)
      assert.are.equal(case[2], ok and "" or err.code, case[1] .. " bytes, writer:line")
      -- the same request built from a table: the line the writer writes is judged
      local body = cjson.decode(text).body
      local ok2, err2 = w:add("x", body)
      assert.are.equal(case[2] == "" and "duplicate_custom_id" or case[2], ok2 and "" or err2.code)
      w:close()
    end
    -- the writer's own line of exactly the limit (its layout differs from cjson's)
    local w = jsonl.writer({ path = dir .. "/own.jsonl", limits = "dashscope-strict" })
    assert(w:chat("p", { model = "qwen-plus", prompt = "" }))
    local probe = assert(w:close())
    local room = max - (probe.bytes - 1)                     -- the bytes the prompt may have
    for _, d in ipairs({ -1, 0, 1 }) do
      w = jsonl.writer({ path = dir .. "/own.jsonl", limits = "dashscope-strict" })
      local ok, err = w:chat("p", { model = "qwen-plus", prompt = ("b"):rep(room + d) })
      local m = assert(w:close())
      if d <= 0 then
        assert(ok, err)
        assert.are.equal(max + d + 1, m.bytes)
        assert.is_true(assert(jsonl.validate(m.files[1].path, { limits = "dashscope-strict" })).ok)
      else
        assert.are.equal("line_too_large", err and err.code)
      end
    end
  end)

  it("a file: max_lines lines are taken, one more is refused, reported at that line", function()
    local max = service.profile("dashscope").max_lines
    for _, n in ipairs({ max - 1, max, max + 1 }) do
      local path = H.requests(dir .. "/n.jsonl", n, { url = "/v1/chat/completions", model = "qwen-plus" })
      local rep = assert(jsonl.validate(path))
      assert.are.equal(n, rep.lines)
      if n <= max then
        assert.are.equal("", codes(rep))
      else
        assert.are.equal("too_many_tasks", codes(rep))
        assert.are.equal(max + 1, rep.problems[1].line)
      end
    end
  end)

  it("the test model: 100 lines and 1 MB are taken, one more of either is refused", function()
    local T = service.TEST
    for _, n in ipairs({ T.max_lines - 1, T.max_lines, T.max_lines + 1 }) do
      local rep = assert(jsonl.validate(H.requests(dir .. "/t.jsonl", n)))
      assert.are.equal(n > T.max_lines and "test_model_too_many_lines" or "", codes(rep), n .. " lines")
    end
    -- one line padded so that the file is max_bytes - 1, max_bytes, max_bytes + 1
    local head = '{"custom_id":"t","method":"POST","url":"/v1/chat/ds-test","body":{"model":"batch-test-model",'
      .. '"messages":[{"role":"user","content":"'
    for _, d in ipairs({ -1, 0, 1 }) do
      local size = T.max_bytes + d
      local text = head .. ("c"):rep(size - 1 - #head - #POST) .. POST
      local rep = assert(jsonl.validate(H.write(dir .. "/tb.jsonl", text .. "\n")))
      assert.are.equal(size, rep.bytes)
      assert.are.equal(d > 0 and "test_model_file_too_large" or "", codes(rep), d)
    end
  end)

  it("the writer's shards: max_lines and max_bytes lines to a file, the next one to the next file", function()
    for _, max in ipairs({ 1, 2, 3 }) do
      local w = jsonl.writer({ path = dir .. "/s.jsonl", model = "qwen-plus", max_lines = max })
      for i = 1, max * 2 + 1 do assert(w:chat("q" .. i, { prompt = "p" })) end
      local m = assert(w:close())
      assert.are.equal(3, #m.files)
      assert.are.same({ max, max, 1 }, { m.files[1].lines, m.files[2].lines, m.files[3].lines })
    end
    -- bytes: lines of the same size; a file of exactly max_bytes holds them all
    local w = jsonl.writer({ path = dir .. "/size.jsonl", model = "qwen-plus" })
    assert(w:chat("q1", { prompt = "p" }))
    local one = assert(w:close()).bytes
    for _, case in ipairs({ { 3 * one, { 3, 1 } }, { 3 * one - 1, { 2, 2 } }, { 3 * one + 1, { 3, 1 } } }) do
      w = jsonl.writer({ path = dir .. "/size.jsonl", model = "qwen-plus", max_bytes = case[1] })
      for i = 1, 4 do assert(w:chat("q" .. i, { prompt = "p" })) end
      local m = assert(w:close())
      local got = {}
      for i, f in ipairs(m.files) do
        got[i] = f.lines
        assert.is_true(f.bytes <= case[1])
        assert.are.equal(f.bytes, #H.read(f.path))
      end
      assert.are.same(case[2], got, "max_bytes " .. case[1])
    end
    -- a single line larger than max_bytes fits no file
    w = jsonl.writer({ path = dir .. "/big.jsonl", model = "qwen-plus", max_bytes = one - 1 })
    local ok, err = w:chat("q1", { prompt = "p" })
    assert.is_nil(ok)
    assert.are.equal("file_too_large", err.code)
    w:close()
  end)

  it("embedding inputs: the profile's count is taken, one more is refused", function()
    local max = service.profile("openai").max_embedding_inputs
    for _, d in ipairs({ -1, 0, 1 }) do
      local inputs = {}
      for i = 1, max + d do inputs[i] = "t" end
      local text = cjson.encode({ custom_id = "e", method = "POST", url = "/v1/embeddings",
        body = { model = "text-embedding-3-small", input = inputs } })
      local rep = assert(jsonl.validate(H.write(dir .. "/e.jsonl", text .. "\n"), { limits = "openai" }))
      assert.are.equal(d > 0 and "too_many_inputs" or "", codes(rep), d)
    end
  end)

  it("the results reader: every result joined with max_index results a chunk, one under and one over", function()
    for _, n in ipairs({ 4, 5, 6 }) do
      local inputs = H.requests(dir .. "/in.jsonl", n, { url = "/v1/chat/completions", model = "qwen-plus" })
      local f = assert(io.open(dir .. "/out.jsonl", "wb"))
      for i = n, 1, -1 do
        f:write(cjson.encode({ id = "o" .. i, custom_id = "req-" .. i, response = { status_code = 200,
          body = { choices = { { message = { content = "answer " .. i } } } } } }), i == 1 and "" or "\n")
      end
      f:close()
      for _, max_index in ipairs({ 1, 4, 5, 6 }) do
        local r = assert(results.open({ output = dir .. "/out.jsonl", inputs = inputs, max_index = max_index }))
        local seen = {}
        for rec in r:each() do
          assert.are.equal("answer " .. rec.custom_id:match("%d+"), rec.content)
          assert.are.equal("question " .. rec.custom_id:match("%d+"), rec.prompt)
          seen[#seen + 1] = rec.custom_id
        end
        assert.are.equal(n, #seen, ("%d results, max_index %d"):format(n, max_index))
        local s = assert(r:summary())
        assert.are.same({ n, n, 0 }, { s.total, s.ok, s.missing })
      end
    end
  end)
end)
