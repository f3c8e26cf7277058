-- The writer's C encoder (lbatch/core/enc.c) held byte for byte against
-- lua-cjson's encode over a corpus (Chinese text, escapes, every control
-- byte, numbers of every kind, empty arrays and objects, nested content
-- parts, images) and random numbers and tables; the writer's lines against
-- the line lua-cjson would make; and what the encoder leaves to the Lua
-- path (sparse arrays, metatables, other keys, functions, bad UTF-8, long
-- lines) still refused or written as before.
local H = require "helper"
local cjson = require "cjson"
local core = require "lbatch.core"
local json = require "lbatch.json"
local jsonl = require "lbatch.jsonl"

local MARK = type(json.empty_array) == "string" and json.empty_array or nil
local function c_encode(v) return core.encode(v, MARK) end

local controls = {}
for c = 0, 31 do controls[#controls + 1] = string.char(c) end
controls = table.concat(controls) .. "\127"

local image = "data:image/png;base64," .. ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJ+/="):rep(3000)

local corpus = {
  { model = "qwen-plus", messages = { { role = "user", content = "你好，世界！请用中文回答：2 + 2 = ?" } } },
  { model = "qwen-plus", messages = { { role = "system", content = "Quote \" backslash \\ slash / tab \t nl \n cr \r" } } },
  { text = controls, more = "\b\f", emoji = "😀 \244\143\191\191 \226\128\168\226\128\169", latin = "café naïve" },
  { ints = { 0, 1, -1, 42, 512, 99999999999999, -99999999999999, 100000000000000, 2 ^ 53, -(2 ^ 53), 1e15 } },
  { floats = { 0.1, 0.7, -0.5, 1 / 3, 2 / 3, 1e-4, 1.5e-4, 9.9e-5, 1e-7, 123456.789, 1e300, -1e-300, 5e-324,
               99999999999999.9, 0.30000000000000004, 1.7976931348623157e308, 3.14159265358979 } },
  { zero = 0, negzero = -0.0, t = true, f = false, null = cjson.null },
  { empty_object = {}, empty_array = json.empty_array, list = json.array({ 1, 2 }), nested = { {}, { {} } } },
  { model = "qwen-vl-max", messages = { { role = "user", content = {
      { type = "text", text = "What is in this picture? 这是什么？" },
      { type = "image_url", image_url = { url = image } },
      { type = "image_url", image_url = { url = "https://example.com/a/b.png?x=1&y=2" } } } } } },
  { model = "text-embedding-v4", input = { "one", "two", "三" }, dimensions = 1024, encoding_format = "float" },
  { ["key with \"quotes\""] = 1, ["/"] = "/", [""] = "", ["中文键"] = { ["\n"] = "\t" } },
  { tools = { { type = "function", ["function"] = { name = "f", parameters = { type = "object", properties = {} } } } },
    temperature = 0.7, top_p = 0.95, max_tokens = 512, stream = false, enable_thinking = false },
}
if math.maxinteger then
  corpus[#corpus + 1] = { big = { math.maxinteger, math.mininteger, 123456789012345678, -7 } }
end
do
  local deep = {}
  local t = deep
  for _ = 1, 998 do t.x = {} t = t.x end
  corpus[#corpus + 1] = deep   -- the last: lua-cjson encodes it, but decodes at most 1000 levels
end

describe("the writer's encoder", function()
  it("writes what lua-cjson writes, byte for byte, over the corpus", function()
    for i, v in ipairs(corpus) do
      local mine = c_encode(v)
      assert.is_string(mine, "case " .. i .. " left to lua-cjson")
      assert.are.equal(json.encode(v), mine, "case " .. i)
    end
  end)

  it("writes every number as lua-cjson does (%.14g, -0, whole numbers)", function()
    local seed = 7
    local function rnd() seed = (seed * 1103515245 + 12345) % 2147483648 return seed / 2147483648 end
    local bad = {}
    local function check(x)
      if cjson.encode(x) ~= c_encode(x) then bad[#bad + 1] = ("%.17g"):format(x) end
    end
    for i = 1, 20000 do
      local r = rnd()
      check(r) check(-r * 1000) check(math.floor(r * 1e6) / 1e3) check(r * 10 ^ math.floor(rnd() * 40 - 20))
      check(math.floor(r * 1e14 + 0.5) / 1e14) check(math.floor(r * 1e15) / 1e5) check(i / 7) check(0.1 * i)
    end
    assert.are.same({}, bad)
  end)

  it("writes random tables as lua-cjson does", function()
    local seed = 11
    local function rnd(n) seed = (seed * 1103515245 + 12345) % 2147483648 return seed % n + 1 end
    local pieces = { "a", "中", "\"", "\\", "/", "\n", "\0", "\31", "\127", "é", "😀", " ", "x" }
    local function str()
      local t = {}
      for k = 1, rnd(8) - 1 do t[k] = pieces[rnd(#pieces)] end
      return table.concat(t)
    end
    local gen
    function gen(depth)
      local k = rnd(depth > 3 and 5 or 7)
      if k == 1 then return str() elseif k == 2 then return rnd(2000) / 8 - 100
      elseif k == 3 then return rnd(2) == 1 elseif k == 4 then return cjson.null
      elseif k == 5 then return -rnd(100000)
      elseif k == 6 then
        local t = {}
        for j = 1, rnd(4) - 1 do t[j] = gen(depth + 1) end
        return t
      end
      local t = {}
      for _ = 1, rnd(4) - 1 do t[str()] = gen(depth + 1) end
      return t
    end
    for i = 1, 3000 do
      local v = { v = gen(0) }
      assert.are.equal(cjson.encode(v), c_encode(v), "table " .. i)
    end
  end)

  it("leaves to lua-cjson what it cannot decide", function()
    local cases = {
      { 1, nil, 3 },                                    -- sparse
      setmetatable({ a = 1 }, { __index = {} }),        -- a metatable
      { [1] = "a", x = "b" },                           -- mixed keys
      { [1.5] = 1 }, { [true] = 1 },                    -- keys that are not strings
      { f = print }, { n = 0 / 0 }, { n = math.huge },  -- not JSON
      { s = "\255\254" },                               -- not UTF-8
    }
    local deep = {}
    local t = deep
    for _ = 1, 1000 do t.x = {} t = t.x end
    cases[#cases + 1] = deep
    for i, v in ipairs(cases) do assert.is_nil(c_encode(v), "case " .. i) end
  end)
end)

describe("the writer's lines", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() os.execute("rm -rf '" .. dir .. "'") end)

  local function read(path)
    local f = assert(io.open(path, "rb"))
    local s = f:read("*a")
    f:close()
    return s
  end

  it("are lua-cjson's line for the same request, one walk in C", function()
    local w = jsonl.writer({ path = dir .. "/a.jsonl" })
    local enc, want = core.encoder(MARK), {}
    for i = 1, #corpus - 1 do
      local body = { model = "qwen-plus", messages = { { role = "user", content = "x" } }, extra = corpus[i] }
      local id = "req/" .. i .. " 中"
      assert.is_number(enc:encode(id, "/v1/chat/completions", body, 6 * 1024 * 1024), "case " .. i)
      assert(w:add(id, body))
      want[i] = '{"custom_id":' .. cjson.encode(id) .. ',"method":"POST","url":"/v1/chat/completions","body":'
        .. json.encode(body) .. "}\n"
    end
    local m = assert(w:close())
    assert.are.equal(table.concat(want), read(dir .. "/a.jsonl"))
    assert.are.equal(#table.concat(want), m.bytes)
    assert.is_true(jsonl.validate(dir .. "/a.jsonl").ok)
  end)

  it("are lua-cjson's on the Lua path too (a sparse array, a metatable)", function()
    local w = jsonl.writer({ path = dir .. "/b.jsonl" })
    local body = { model = "qwen-plus", messages = { { role = "user", content = "x" } }, extra = { 1, nil, 3 } }
    assert(w:add("s1", body))
    local mt = setmetatable({ model = "qwen-plus", messages = { { role = "user", content = "y" } } }, {})
    assert(w:add("s2", mt))
    w:close()
    assert.are.equal('{"custom_id":"s1","method":"POST","url":"/v1/chat/completions","body":' .. cjson.encode(body)
      .. '}\n{"custom_id":"s2","method":"POST","url":"/v1/chat/completions","body":' .. cjson.encode(mt) .. "}\n",
      read(dir .. "/b.jsonl"))
  end)

  it("are refused as before: duplicate, bad UTF-8, too long, not JSON", function()
    local w = jsonl.writer({ path = dir .. "/c.jsonl", limits = "dashscope-strict" })
    local function body(extra) return { model = "qwen-plus", messages = { { role = "user", content = extra } } } end
    assert(w:add("d1", body("a")))
    local ok, err = w:add("d1", body("b"))
    assert.is_nil(ok)
    assert.are.equal("duplicate_custom_id", err.code)
    assert.matches("duplicate of line 1", err.message)
    ok, err = w:add("u1", body("ok \255 then"))
    assert.is_nil(ok)
    assert.are.equal("invalid_utf8", err.code)
    assert.matches("byte %d+", err.message)
    ok, err = w:add("l1", body(("x"):rep(1024 * 1024)))
    assert.is_nil(ok)
    assert.are.equal("line_too_large", err.code)
    ok, err = w:add("f1", { model = "qwen-plus", messages = { { role = "user", content = print } } })
    assert.is_nil(ok)
    assert.are.equal("invalid_body", err.code)
    ok, err = w:add("o1", { model = "qwen-plus", prompt = "not UTF-8 \255" })   -- and no messages
    assert.is_nil(ok)
    assert.are.equal("invalid_utf8", err.code)                 -- the line's rule first, as validate
    ok, err = w:add("o2", { model = "qwen-plus", prompt = "no messages" })
    assert.is_nil(ok)
    assert.are.equal("missing_field", err.code)
    ok, err = w:add("", body("a"))
    assert.is_nil(ok)
    assert.are.equal("missing_custom_id", err.code)
    assert(w:add("d2", body("c")))
    local m = assert(w:close())
    assert.are.equal(2, m.lines)
  end)

  it("refuses what is not an encoder, an idmap or an open file", function()
    local enc = core.encoder()
    assert.is_number(enc:encode("x", "/v1/chat/completions", { a = 1 }, 100))
    local f = assert(io.open(dir .. "/d.jsonl", "wb"))
    assert.has_error(function() enc:write(f, {}, "x", 1) end)
    assert.has_error(function() enc.write({}, f, core.idmap(), "x", 1) end)
    f:close()
    assert.has_error(function() enc:write(f, core.idmap(), "x", 1) end)
  end)
end)
