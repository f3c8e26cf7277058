-- The answer shape checker (lbatch.impl.formats.shape) on its own, on
-- hostile answers, and the results reader's invalid_answer class on files
-- written here (the emulator's real answers: integration/formats/shape_spec).
local H = require "helper"
local shape = require "lbatch.impl.formats.shape"
local results = require "lbatch.results"
local cjson = require "cjson"

local SCHEMA = {
  type = "object", required = { "score", "person" },
  properties = {
    score = { type = "integer" },
    label = { type = "string", enum = { "good", "bad" } },
    person = { type = "object", required = { "age" },
               properties = { age = { type = { "integer", "null" } }, name = { type = "string" } } },
    tags = { type = "array", items = { type = "string" } },
    ratio = { type = "number" }, flag = { type = "boolean" }, nothing = { type = "null" },
  },
}
local WANT = { type = "json_schema", schema = SCHEMA }

local function why(text, want) return select(2, shape.check(text, want or WANT)) end

describe("shape.wanted", function()
  it("reads response_format json_object and json_schema, and the responses API's text.format", function()
    assert.are.same({ type = "json_object" }, shape.wanted({ response_format = { type = "json_object" } }))
    assert.are.same({ type = "json_schema", schema = SCHEMA },
      shape.wanted({ response_format = { type = "json_schema", json_schema = { name = "x", schema = SCHEMA } } }))
    assert.are.same({ type = "json_schema", schema = SCHEMA },
      shape.wanted({ text = { format = { type = "json_schema", name = "x", schema = SCHEMA } } }))
  end)
  it("is nil for text, no format, or a body that is not a table", function()
    assert.is_nil(shape.wanted({ response_format = { type = "text" } }))
    assert.is_nil(shape.wanted({ messages = {} }))
    assert.is_nil(shape.wanted({ text = "json_object" }))
    assert.is_nil(shape.wanted("response_format"))
    assert.is_nil(shape.wanted(nil))
  end)
end)

describe("shape.check", function()
  it("passes a valid answer and returns its value", function()
    local v, msg = shape.check('{"score": 3, "person": {"age": null, "name": "Li"}, "tags": ["a"], '
      .. '"ratio": 0.5, "flag": false, "nothing": null, "label": "good"}', WANT)
    assert.is_nil(msg)
    assert.are.equal(3, v.score)
    assert.are.equal(cjson.null, v.person.age)
    assert.are.equal("a", v.tags[1])
  end)
  it("names an answer that is not JSON", function()
    assert.matches("^answer is not JSON: ", why('Sure! {"score": '))
    assert.matches("^answer is not JSON: ", why('{"score": 1} trailing'))
    assert.matches("^answer is not JSON: ", why(''))
    assert.are.equal("answer is not JSON: it has no text", why(nil))
  end)
  it("names the missing required field, nested ones by their path", function()
    assert.are.equal("answer lacks required field 'score'", why('{"person": {"age": 1}}'))
    local msg, field = select(2, shape.check('{"score": 1, "person": {"name": "x"}}', WANT))
    assert.are.equal("answer lacks required field 'person.age'", msg)
    assert.are.equal("person.age", field)
  end)
  it("names a field of the wrong basic type", function()
    assert.are.equal("field 'score' is a string, the schema says integer", why('{"score": "3", "person": {"age": 1}}'))
    assert.are.equal("field 'score' is a number, the schema says integer", why('{"score": 3.5, "person": {"age": 1}}'))
    assert.are.equal("field 'person.age' is a string, the schema says integer or null",
      why('{"score": 3, "person": {"age": "9"}}'))
    assert.are.equal("field 'tags[1]' is a number, the schema says string",
      why('{"score": 3, "person": {"age": 1}, "tags": ["a", 2]}'))
    assert.are.equal("field 'flag' is a string, the schema says boolean",
      why('{"score": 3, "person": {"age": 1}, "flag": "true"}'))
    assert.are.equal("field 'nothing' is a number, the schema says null",
      why('{"score": 3, "person": {"age": 1}, "nothing": 0}'))
    assert.are.equal("answer is an array, the schema says object", why('[1, 2]'))
  end)
  it("checks enum and const, and takes 1.0 as an integer", function()
    assert.are.equal("field 'label' is not one of the values the schema allows",
      why('{"score": 3, "person": {"age": 1}, "label": "meh"}'))
    assert.is_nil(why('{"score": 3.0, "person": {"age": 1}, "label": "bad"}'))
    assert.is_nil(why('"x"', { type = "json_schema", schema = { const = "x" } }))
    assert.is_not_nil(why('"y"', { type = "json_schema", schema = { const = "x" } }))
  end)
  it("follows local $refs and anyOf (pydantic's shapes)", function()
    local s = { type = "object", required = { "who" }, properties = { who = { ["$ref"] = "#/$defs/Person" } },
                ["$defs"] = { Person = { type = "object", required = { "age" },
                  properties = { age = { anyOf = { { type = "integer" }, { type = "null" } } } } } } }
    local want = { type = "json_schema", schema = s }
    assert.is_nil(why('{"who": {"age": 4}}', want))
    assert.is_nil(why('{"who": {"age": null}}', want))
    assert.are.equal("answer lacks required field 'who.age'", why('{"who": {}}', want))
    assert.are.equal("field 'who.age' is a string, the schema says integer", why('{"who": {"age": "4"}}', want))
  end)
  it("holds json_object answers to being an object", function()
    local o = { type = "json_object" }
    assert.is_nil(why('{"a": 1}', o))
    assert.is_nil(why('{}', o))
    assert.are.equal("answer is an array, not a JSON object", why('[1]', o))
    assert.are.equal("answer is a number, not a JSON object", why('42', o))
  end)

  describe("on hostile answers, never raises", function()
    it("deep nesting: not JSON past the decoder's depth; within it, checked", function()
      assert.matches("^answer is not JSON: ", why(("["):rep(100000) .. ("]"):rep(100000)))
      local deep = ('{"a":'):rep(900) .. "1" .. ("}"):rep(900)
      assert.are.equal("answer is an object, the schema says array",
        why(deep, { type = "json_schema", schema = { type = "array" } }))
    end)
    it("huge numbers are numbers, not integers; NaN, Infinity and hex are not JSON", function()
      assert.are.equal("field 'score' is a number, the schema says integer", why('{"score": 1e999, "person": {"age": 1}}'))
      assert.are.equal("field 'score' is a number, the schema says integer", why('{"score": -1e999, "person": {"age": 1}}'))
      assert.is_nil(why('{"score": 12345678901234567890123, "person": {"age": 1}}'))
      for _, bad in ipairs({ "NaN", "Infinity", "-Infinity", "0x10", ".5", "01", "+1" }) do
        assert.matches("^answer is not JSON: ", why('{"score": ' .. bad .. ', "person": {"age": 1}}'))
      end
    end)
    it("invalid UTF-8 is not JSON, and says where", function()
      assert.are.equal("answer is not JSON: invalid UTF-8 at byte 12", why('{"score": "\255", "person": {"age": 1}}'))
      assert.matches("^answer is not JSON: invalid UTF%-8", why('{"a": "\237\160\128"}'))   -- a surrogate
      assert.matches("^answer is not JSON: invalid UTF%-8", why('{"a": "\192\128"}'))       -- overlong
    end)
    it("NUL bytes, lone surrogates escaped, huge strings and arrays, a cyclic or deep schema", function()
      assert.matches("^answer is not JSON: ", why('{"score": 1,\0 "person": {"age": 1}}'))
      assert.is_string(why('{"score": 1, "person": {"age": 1, "name": "\\ud800"}}'))
      local big = '{"score": 1, "person": {"age": 1}, "tags": [' .. ('"x",'):rep(200000) .. '"y"]}'
      assert.is_nil(why(big))
      local cyc = { ["$ref"] = "#" }
      assert.is_nil(why('{"a": 1}', { type = "json_schema", schema = cyc }))
      local s = { type = "object" }
      for _ = 1, 500 do s = { type = "object", properties = { a = s }, required = { "a" } } end
      local v = ('{"a":'):rep(500) .. "{}" .. ("}"):rep(500)
      assert.is_nil(why(v, { type = "json_schema", schema = s }))
      local wide = { anyOf = {} }
      for i = 1, 60 do wide = { anyOf = { wide, wide, { type = "string", const = "never" .. i } } } end
      -- (3^60 branches: past MAX_STEPS it is not checked further, and passes)
      assert.is_nil(why('{"a": 1}', { type = "json_schema", schema = wide }))
    end)
    it("random bytes never raise", function()
      math.randomseed(36)
      for _ = 1, 2000 do
        local t = {}
        for i = 1, math.random(0, 40) do t[i] = string.char(math.random(0, 255)) end
        local ok, _, msg = pcall(shape.check, '{"score": ' .. table.concat(t), WANT)
        assert.is_true(ok)
        assert.is_string(msg)
      end
    end)
  end)
end)

describe("results: invalid_answer", function()
  local dir = H.tmpdir()

  local function request(id, format)
    return cjson.encode({ custom_id = id, method = "POST", url = "/v1/chat/completions",
      body = { model = "qwen-plus", messages = { { role = "user", content = "rate " .. id } },
               response_format = format } })
  end
  local function answer(id, content)
    return cjson.encode({ id = "r" .. id, custom_id = id, error = cjson.null, response = { status_code = 200,
      request_id = "q" .. id, body = { model = "qwen-plus", choices = { { index = 0, message = {
        role = "assistant", content = content } } }, usage = { prompt_tokens = 10, completion_tokens = 5,
        total_tokens = 15 } } } })
  end
  local function write(name, lines)
    local path = dir .. "/" .. name
    local fh = assert(io.open(path, "wb"))
    fh:write(table.concat(lines, "\n"), "\n")
    fh:close()
    return path
  end
  local schema = { type = "json_schema", json_schema = { name = "r", schema = { type = "object",
    required = { "score" }, properties = { score = { type = "integer" } } } } }

  local req = { a = request("a", schema), b = request("b", schema), c = request("c", schema),
                d = request("d", { type = "json_object" }), e = request("e", nil), f = request("f", { type = "text" }) }
  local inputs = write("in.jsonl", { req.a, req.b, req.c, req.d, req.e, req.f })
  local output = write("out.jsonl", { answer("a", '{"score": 4}'), answer("b", "I think 4"),
    answer("c", '{"score": "4"}'), answer("d", "[4]"), answer("e", "not JSON, not asked"),
    answer("f", "plain text") })

  it("classes each answer with inputs, and names why on rec.error", function()
    local r = assert(results.open({ output = output, inputs = inputs }))
    local got = {}
    for rec in r:each() do got[rec.custom_id] = rec end
    assert.is_true(got.a.ok)
    assert.are.equal(4, got.a.json.score)
    assert.is_false(got.b.ok)
    assert.are.equal("invalid_answer", got.b.class)
    assert.are.equal("invalid_answer", got.b.error.code)
    assert.are.equal("decode", got.b.error.kind)
    assert.matches("^answer is not JSON: ", got.b.error.message)
    assert.are.equal(got.b.error.message, got.b.error_message)
    assert.are.equal("field 'score' is a string, the schema says integer", got.c.error.message)
    assert.are.equal("score", got.c.error.param)
    assert.are.equal("4", got.c.json.score)
    assert.matches("lbatch: decode invalid_answer: field 'score'", tostring(got.c.error))
    assert.are.equal("answer is an array, not a JSON object", got.d.error_message)
    assert.are.same({ "invalid_answer", "invalid_answer" }, { results.classify(got.d) })
    assert.is_true(got.e.ok)
    assert.is_true(got.f.ok)
    assert.is_nil(got.e.json)
  end)
  it("counts them apart in summary, tokens included (billed)", function()
    local s = assert(assert(results.open({ output = output, inputs = inputs })):summary())
    assert.are.equal(6, s.total)
    assert.are.equal(3, s.ok)
    assert.are.equal(0, s.failed)
    assert.are.equal(3, s.invalid_answers)
    assert.are.equal(3, s.by_class.invalid_answer)
    assert.are.equal(3, s.by_code.invalid_answer)
    assert.is_nil(s.by_error.invalid_answer)
    assert.are.equal(90, s.total_tokens)
  end)
  it("cannot check without inputs: every answer is ok there", function()
    local s = assert(assert(results.open({ output = output })):summary())
    assert.are.equal(6, s.ok)
    assert.are.equal(0, s.invalid_answers)
  end)
  it("resubmits them only when asked, byte for byte", function()
    local r = assert(results.open({ output = output, inputs = inputs }))
    local path = dir .. "/again.jsonl"
    assert.are.equal(0, (r:resubmit(path)))
    local n, taken = r:resubmit(path, { classes = { "retryable", "invalid_answer" } })
    assert.are.equal(3, n)
    assert.are.same({ invalid_answer = 3 }, taken)
    local fh = assert(io.open(path, "rb"))
    assert.are.equal(req.b .. "\n" .. req.c .. "\n" .. req.d .. "\n", fh:read("*a"))
    fh:close()
    assert.are.equal(3, (r:resubmit(path, { all = true })))
    assert.has_error(function() r:resubmit(path, { classes = { "invalid" } }) end)
  end)
end)
