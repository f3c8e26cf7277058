-- lbatch.json: lua-cjson, plus empty arrays and decoded values as Lua code
-- expects them (no server, no nginx).
local json = require "lbatch.json"
local cjson = require "cjson"

describe("json", function()
  it("writes an empty array as [] (json.empty_array, json.array), and an empty table as {}", function()
    assert.are.equal("[]", json.encode(json.empty_array))
    assert.are.equal('{"data":[]}', json.encode({ data = json.array({}) }))
    local list = json.encode({ object = "list", data = json.array({}) })
    assert.is_truthy(list:find('"data":[]', 1, true), list)
    assert.are.equal("{}", json.encode({}))
    assert.are.equal("[[],[[]]]", json.encode({ json.empty_array, { json.empty_array } }))
    local t = { 1, 2 }
    assert.are.equal(t, json.array(t))
    assert.are.equal("[1,2]", json.encode(json.array(t)))
  end)

  it("encodes like cjson otherwise, strings with the marker's characters included", function()
    for _, v in ipairs({ { a = 1 }, { "x", "y" }, "plain", 3, true, { s = "\0lbatch" }, { s = "\\u0000" } }) do
      assert.are.equal(cjson.encode(v), json.encode(v))
    end
    assert.are.same({ s = "\0lbatch:empty-array" }, cjson.decode(json.encode({ s = "\0lbatch:empty-array" })) )
  end)

  it("fix: turns the markers in cjson's output into []", function()
    local s = cjson.encode({ a = json.empty_array })
    assert.are.equal('{"a":[]}', json.fix(s))
    assert.are.equal('{"a":1}', json.fix('{"a":1}'))
    if json.MARK ~= "\0never\0" then assert.is_truthy(s:find(json.MARK, 1, true)) end
  end)

  it("normalize: JSON null becomes nil at any depth; whole numbers become integers (5.3+)", function()
    local v = json.normalize(json.decode('{"a":null,"b":{"c":null,"d":[1,null,3]},"n":42,"f":1.5,"big":1e15}'))
    assert.is_nil(v.a)
    assert.is_nil(v.b.c)
    assert.are.equal(1, v.b.d[1])
    assert.is_nil(v.b.d[2])
    assert.are.equal(3, v.b.d[3])
    assert.are.equal(42, v.n)
    assert.are.equal(1.5, v.f)
    if math.type then
      assert.are.equal("integer", math.type(v.n))
      assert.are.equal("integer", math.type(v.big))
      assert.are.equal("float", math.type(v.f))
    end
    local t = {}
    assert.are.equal(t, json.normalize(t))         -- in place
  end)

  it("decode: raises on invalid JSON, keeps null as json.null", function()
    assert.has_error(function() json.decode("{bad") end)
    assert.are.equal(json.null, json.decode('{"a":null}').a)
    assert.are.equal(cjson.null, json.null)
  end)

  it("object: a JSON object or nil and why; nulls left in", function()
    assert.are.same({ a = 1 }, json.object('  {"a":1}'))
    assert.are.equal(json.null, json.object('{"a":null}').a)
    assert.are.same({}, json.object("{}"))
    for _, s in ipairs({ "[1]", "1", '"x"', "null", "", "  ", "{bad", "x{}" }) do
      local v, why = json.object(s)
      assert.is_nil(v, s)
      assert.is_string(why, s)
    end
    assert.are.equal("not a JSON object", select(2, json.object("[1]")))
  end)
end)
