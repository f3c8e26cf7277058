--- Answers checked for shape: what a request that asks for JSON
-- (`response_format` `json_object` or `json_schema`; the responses API's
-- `text.format`) gets back, parsed and held to the schema's basic rules.
--
-- Not a JSON Schema engine: it checks `type` (string, number, integer,
-- boolean, object, array, null, or a list of them), `required`,
-- `properties` (nested objects' required fields too), `items`, `enum` and
-- `const` (scalars; a table in them passes), `anyOf` and `oneOf` (as
-- anyOf: one branch that passes is enough), and local `$ref`s
-- (`#/$defs/X`, `#/definitions/X`, `#`). Every other keyword (patterns,
-- bounds, `additionalProperties`, ...) is not checked. An empty `[]` and
-- an empty `{}` decode alike: either passes as an object or an array. A
-- schema deeper than `MAX_DEPTH` or costlier than `MAX_STEPS` checks is
-- not checked further (a `$ref` cycle). The text is decoded by lua-cjson
-- (which also takes a number written `1.`).
-- Never raises on a hostile answer (deep nesting, huge numbers, invalid
-- UTF-8, NaN): a bad answer is a message.
-- @module lbatch.impl.formats.shape
local cjson = require "cjson.safe"
local rules = require "lbatch.impl.formats.rules"

local M = { MAX_DEPTH = 64, MAX_STEPS = 1000000, DECODE_DEPTH = 1000 }

local null = cjson.null
local huge, floor = math.huge, math.floor
local decoder = cjson.new()
decoder.decode_max_depth(M.DECODE_DEPTH)
decoder.decode_invalid_numbers(false)   -- NaN, Infinity, 0x10: not JSON

local function tab(v) if type(v) == "table" then return v end end

--- The JSON a request's body asks for, or nil when it asks for none.
-- @tparam table body a request's body
-- @treturn ?table `{type = "json_object"}` or `{type = "json_schema",
-- schema = table or nil}`
function M.wanted(body)
  if type(body) ~= "table" then return nil end
  local f = tab(body.response_format)
  local schema
  if f then
    schema = tab(f.json_schema) and tab(f.json_schema.schema)
  else
    f = tab(body.text) and tab(body.text.format)       -- the responses API's
    schema = f and tab(f.schema)
  end
  if not f then return nil end
  if f.type == "json_object" then return { type = "json_object" } end
  if f.type == "json_schema" then return { type = "json_schema", schema = schema } end
end

--- An answer's text parsed as JSON: the value, or nil and why.
-- @param text the answer's content
-- @return the value (JSON null as `cjson.null`), or nil and a message
function M.decode(text)
  if type(text) ~= "string" then return nil, "answer is not JSON: it has no text" end
  local bad = rules.utf8_bad(text)
  if bad then return nil, ("answer is not JSON: invalid UTF-8 at byte %d"):format(bad) end
  local ok, v, why = pcall(decoder.decode, text)
  if not ok then why, v = v, nil end
  if v == nil then
    why = tostring(why or "not JSON"):gsub("^Expected", "expected"):sub(1, 120)
    return nil, "answer is not JSON: " .. why
  end
  return v
end

-- a decoded value's JSON type: "object", "array", "empty" (either),
-- "string", "number", "boolean", "null"
local function kind(v)
  local t = type(v)
  if t == "table" then
    local n = #v
    if n == 0 then return next(v) == nil and "empty" or "object" end
    for k in pairs(v) do
      if type(k) ~= "number" then return "object" end
    end
    return "array"
  end
  if v == null then return "null" end
  return t
end

local function is_integer(v)
  return type(v) == "number" and v == v and v ~= huge and v ~= -huge and floor(v) == v
end

-- does value v (of JSON kind k) have schema type t?
local function has_type(v, k, t)
  if t == "integer" then return is_integer(v) end
  if k == "empty" then return t == "object" or t == "array" end
  return k == t
end

local ARTICLE = { object = "an object", array = "an array", integer = "an integer", empty = "an empty array or object" }
local function a(k) return ARTICLE[k] or ("a " .. k) end

-- the schema's types as a list and as text ("string or null"); nil when untyped
local function types_of(s)
  local t = s.type
  if type(t) == "string" then return { t }, t end
  if type(t) == "table" and #t > 0 then
    local names = {}
    for i, x in ipairs(t) do names[i] = tostring(x) end
    return t, table.concat(names, " or ")
  end
end

-- a field's name for messages: "score", "person.age", "items[0].name"
local function join(path, key)
  if type(key) == "number" then return (path or "") .. "[" .. key .. "]" end
  if not path then return key end
  return path .. "." .. key
end

-- the schema a local $ref names in root, or nil
local function resolve(root, ref)
  if ref == "#" then return root end
  local node = root
  for part in ref:gmatch("/([^/]+)") do
    part = part:gsub("~1", "/"):gsub("~0", "~")
    node = tab(node) and node[part]
  end
  return tab(node)
end

local check

-- enum and const: scalars compared; a table in them passes
local function check_enum(v, s, path)
  local list = tab(s.enum)
  if s.const ~= nil then list = { s.const } end
  if not list or type(v) == "table" then return nil end
  for _, x in ipairs(list) do
    if x == v or type(x) == "table" then return nil end
  end
  return ("field '%s' is not one of the values the schema allows"):format(path or "(the answer)"), path
end

-- an object's required fields and properties
local function check_object(v, s, path, root, depth)
  for _, name in ipairs(tab(s.required) or {}) do
    if type(name) == "string" and v[name] == nil then
      local field = join(path, name)
      return ("answer lacks required field '%s'"):format(field), field
    end
  end
  local props = tab(s.properties)
  if props then
    for name, sub in pairs(props) do
      if type(name) == "string" and v[name] ~= nil and tab(sub) then
        local msg, field = check(v[name], sub, join(path, name), root, depth + 1)
        if msg then return msg, field end
      end
    end
  end
end

-- an array's items (one schema for every item)
local function check_array(v, s, path, root, depth)
  local items = tab(s.items)
  if not items or #items > 0 then return nil end        -- (a tuple's list of schemas: not checked)
  for i = 1, #v do
    local msg, field = check(v[i], items, join(path, i - 1), root, depth + 1)
    if msg then return msg, field end
  end
end

-- anyOf / oneOf: the first branch's message when none passes
local function check_any(v, list, path, root, depth)
  local first
  for _, sub in ipairs(list) do
    if tab(sub) then
      local msg, field = check(v, sub, path, root, depth + 1)
      if not msg then return nil end
      first = first or { msg, field }
    end
  end
  if first then return first[1], first[2] end
end

-- value v against schema s at path (root: {schema, steps}): nil, or a
-- message and the field
function check(v, s, path, root, depth)
  -- (a $ref cycle, a schema too deep or too costly: not checked further)
  root.steps = root.steps + 1
  if depth > M.MAX_DEPTH or root.steps > M.MAX_STEPS then return nil end
  local ref = s["$ref"]
  if type(ref) == "string" then
    local target = resolve(root.schema, ref)
    if target then return check(v, target, path, root, depth + 1) end
  end
  local k = kind(v)
  local list, text = types_of(s)
  if list then
    local fits = false
    for _, t in ipairs(list) do if has_type(v, k, t) then fits = true break end end
    if not fits then
      if not path then return ("answer is %s, the schema says %s"):format(a(k), text), nil end
      return ("field '%s' is %s, the schema says %s"):format(path, a(k), text), path
    end
  end
  local msg, field = check_enum(v, s, path)
  if msg then return msg, field end
  local any = tab(s.anyOf) or tab(s.oneOf)
  if any then
    msg, field = check_any(v, any, path, root, depth)
    if msg then return msg, field end
  end
  if k == "object" or k == "empty" then return check_object(v, s, path, root, depth) end
  if k == "array" then return check_array(v, s, path, root, depth) end
end

--- An answer's text held to what its request asked for.
-- @param text the answer's content (a string; anything else is not JSON)
-- @tparam table want what `shape.wanted` returned
-- @return the parsed value (also when its shape is wrong), or nil
-- @treturn ?string why the answer is invalid: "answer is not JSON: ...",
-- "answer lacks required field 'score'", "field 'score' is a string, the
-- schema says integer"; nil when it is valid
-- @treturn ?string the field at fault (dotted, `items[0].name`), when one is
function M.check(text, want)
  local v, why = M.decode(text)
  if v == nil then return nil, why end
  local k = kind(v)
  if want.type == "json_object" or not want.schema then
    if k ~= "object" and k ~= "empty" then return v, ("answer is %s, not a JSON object"):format(a(k)) end
    return v
  end
  local ok, msg, field = pcall(check, v, want.schema, nil, { schema = want.schema, steps = 0 }, 0)
  if not ok then return v, "answer could not be checked: " .. tostring(msg):sub(1, 120) end
  return v, msg, field
end

return M
