-- Answers checked for shape (issue 36, item 3) on the emulator over real
-- HTTP: requests that ask for JSON answered valid, not JSON, with a
-- required field missing or of the wrong type (the emulator's
-- `lbatch-emulator:answer=KIND/N` marker), each classed so by the reader's
-- each() and summary() and by the command, and the invalid ones
-- resubmitted by a pipeline and answered valid in the next round.
local H = require "helper"
local lbatch = require "lbatch"
local results = require "lbatch.results"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local SCHEMA = { type = "object", required = { "score", "reason" },
  properties = { score = { type = "integer" }, reason = { type = "string" },
                 tags = { type = "array", items = { type = "string" } } } }
local AS_JSON = { type = "json_schema", json_schema = { name = "rating", strict = true, schema = SCHEMA } }

-- what each request asks and how the emulator is told to answer it the
-- first time: the mix of this spec
local MIX = {
  { "valid-1", AS_JSON }, { "valid-2", AS_JSON }, { "valid-3", { type = "json_object" } },
  { "notjson-1", AS_JSON, "not_json" }, { "notjson-2", { type = "json_object" }, "not_json" },
  { "missing-1", AS_JSON, "missing" }, { "missing-2", AS_JSON, "missing" },
  { "wrongtype-1", AS_JSON, "wrong_type" },
  { "text-1", nil, "not_json" },                     -- asks for no JSON: its text is fine
}
local INVALID = { ["notjson-1"] = "^answer is not JSON: ", ["notjson-2"] = "^answer is not JSON: ",
  ["missing-1"] = "^answer lacks required field 'score'$", ["missing-2"] = "^answer lacks required field 'score'$",
  ["wrongtype-1"] = "^field 'score' is a string, the schema says integer$" }

-- the mix as an input file; `times` how often each marked request slips
-- ("" every time); `tag` keeps the requests of one test apart from another's
local function write_input(path, tag, times)
  local lines = {}
  for i, m in ipairs(MIX) do
    local text = "Rate answer " .. i .. " (" .. tag .. ")"
    if m[3] then text = text .. " lbatch-emulator:answer=" .. m[3] .. times end
    lines[i] = cjson.encode({ custom_id = m[1], method = "POST", url = "/v1/chat/completions",
      body = { model = "qwen-plus", messages = { { role = "user", content = text } }, response_format = m[2] } })
  end
  H.write(path, table.concat(lines, "\n") .. "\n")
  return path
end

describe("answers checked for shape", function()
  local emu, client, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    dir = H.tmpdir()
  end)
  teardown(function() client:close() emu.stop() end)

  -- one batch of the input on the emulator, its output downloaded
  local function run_batch(input)
    local f = assert(client:upload(input))
    local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    b = assert(client:wait(b.id, { interval = 0.05 }))
    assert.are.equal("completed", b.status)
    return assert(client:content(b.output_file_id, { path = input .. ".out" }))
  end

  it("classes each answer in each() and summary(): valid, not JSON, a field missing or mistyped", function()
    local input = write_input(dir .. "/one.jsonl", "one", "")
    local output = run_batch(input)
    local r = assert(results.open({ output = output, inputs = input }))
    local n = 0
    for rec, err in r:each() do
      assert.is_not_nil(rec, tostring(err))
      n = n + 1
      local want = INVALID[rec.custom_id]
      if want then
        assert.is_false(rec.ok, rec.custom_id)
        assert.are.equal("invalid_answer", rec.class)
        assert.are.equal("invalid_answer", rec.error.code)
        assert.matches(want, rec.error.message)
        assert.are.equal(rec.error.message, rec.error_message)
      else
        assert.is_true(rec.ok, rec.custom_id .. ": " .. tostring(rec.error_message))
        assert.is_nil(rec.class)
      end
      if rec.custom_id:find("^valid") then assert.is_table(rec.json) end
      if rec.custom_id == "valid-1" then
        assert.are.equal(7, rec.json.score)
        assert.are.equal("string", type(rec.json.reason))
      end
      if rec.custom_id == "missing-1" then assert.is_nil(rec.json.score) assert.is_string(rec.json.reason) end
      if rec.custom_id == "text-1" then assert.is_nil(rec.json) assert.matches("^Emulated answer", rec.content) end
    end
    assert.are.equal(#MIX, n)
    local s = assert(r:summary())
    assert.are.same({ #MIX, 4, 0, 0, 5 }, { s.total, s.ok, s.failed, s.missing, s.invalid_answers })
    assert.are.same({ invalid_answer = 5 }, s.by_class)
    assert.are.same({ invalid_answer = 5 }, s.by_code)
    assert.is_true(s.total_tokens > 0)
    -- without the inputs the reader cannot know what was asked: every answer is ok
    local plain = assert(assert(results.open({ output = output })):summary())
    assert.are.same({ #MIX, 0 }, { plain.ok, plain.invalid_answers })

    -- the command: rows with the code, and the count in its summary line
    local code, out, stderr = H.lbatch(("results %s --inputs %s --csv %s/one.csv"):format(output, input, dir))
    assert.are.equal(0, code, stderr)
    assert.matches("one.csv: 4 ok, 0 failed, 0 missing, 5 invalid answer%(s%)", out)
    code, out = H.lbatch(("results %s --inputs %s"):format(output, input))
    assert.are.equal(0, code)
    local rows = 0
    for line in out:gmatch("[^\n]+") do
      local row = cjson.decode(line)
      if INVALID[row.custom_id] then
        rows = rows + 1
        assert.are.same({ false, "invalid_answer" }, { row.ok, row.error_code })
        assert.matches(INVALID[row.custom_id], row.error_message)
      end
    end
    assert.are.equal(5, rows)
  end)

  it("resubmits the invalid ones in a pipeline, answered valid in the next round", function()
    local input = write_input(dir .. "/two.jsonl", "two", "/1")      -- each marked request slips once
    local report = assert(pipeline.run({ client = client, requests = input, dir = dir .. "/two", resubmit = true,
      poll_interval = 0.05, max_poll_interval = 0.2 }))
    assert.are.equal(2, #report.shards)
    assert.are.equal(5, report.shards[2].lines)                     -- the invalid answers only
    local first = report.shards[1]
    local r1 = assert(results.open({ output = first.output, inputs = first.path }))
    assert.are.equal(5, assert(r1:summary()).invalid_answers)
    local again = {}
    for line in io.lines(report.shards[2].path) do again[#again + 1] = cjson.decode(line).custom_id end
    table.sort(again)
    assert.are.same({ "missing-1", "missing-2", "notjson-1", "notjson-2", "wrongtype-1" }, again)
    local s = assert(report.results:summary())
    assert.are.same({ #MIX, #MIX, 0, 0 }, { s.total, s.ok, s.failed, s.invalid_answers })
    for rec in report.results:each() do
      if rec.custom_id ~= "text-1" then assert.is_table(rec.json, rec.custom_id) end
    end
  end)

  it("reads the responses API's output text and text.format (OpenAI's dialect)", function()
    local oe = H.emulator({ speed = 200, rate_limits = false, dialect = "openai" })
    local c = assert(lbatch.new({ api_key = "k", base_url = oe.base, region = "openai", poll_budget = 6000 }))
    local format = { type = "json_schema", name = "rating", strict = true, schema = SCHEMA }
    local lines = {}
    for i, kind in ipairs({ "", " lbatch-emulator:answer=missing", " lbatch-emulator:answer=not_json" }) do
      lines[i] = cjson.encode({ custom_id = "r" .. i, method = "POST", url = "/v1/responses",
        body = { model = "gpt-4o-mini", input = "Rate " .. i .. kind, text = { format = format } } })
    end
    local input = H.write(dir .. "/resp.jsonl", table.concat(lines, "\n") .. "\n")
    local f = assert(c:upload(input))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/responses" }))
    b = assert(c:wait(b.id, { interval = 0.05 }))
    local output = assert(c:content(b.output_file_id, { path = input .. ".out" }))
    local got = {}
    for rec in assert(results.open({ output = output, inputs = input })):each() do got[rec.custom_id] = rec end
    assert.is_true(got.r1.ok)
    assert.are.equal(7, got.r1.json.score)
    assert.are.equal("answer lacks required field 'score'", got.r2.error_message)
    assert.matches("^answer is not JSON: ", got.r3.error_message)
    c:close()
    oe.stop()
  end)

  it("stops at max_rounds when the answers stay invalid, and the command says how many", function()
    local input = write_input(dir .. "/three.jsonl", "three", "")    -- they slip every time
    local code, out, stderr = H.lbatch(("run %s --dir %s/three --poll 0.05 --resubmit"):format(input, dir), { emu = emu })
    assert.are.equal(0, code, stderr)
    assert.matches("9 requests, 4 ok, 0 failed, 0 missing, 5 invalid answer%(s%)", out)
    local report = assert(pipeline.run({ client = client, requests = input, dir = dir .. "/three", resubmit = true }))
    assert.are.equal(3, #report.shards)                             -- rounds 1, 2 and 3 (max_rounds 3)
    assert.are.same({ 9, 5, 5 }, { report.shards[1].lines, report.shards[2].lines, report.shards[3].lines })
  end)
end)
