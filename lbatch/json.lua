--- JSON as lbatch reads and writes it: lua-cjson, plus empty arrays, and
-- decoded values the way Lua code expects them.
--
-- lua-cjson writes an empty Lua table as `{}`. Newer builds (OpenResty's
-- lua-cjson 2.1.0.x) have `cjson.empty_array`; Debian's 2.1.0 does not, so
-- there `json.empty_array` is a sentinel string that `encode` turns into
-- `[]` after cjson has run: one plain string search per line, no tree walk.
-- @module lbatch.json
local cjson = require "cjson"
local safe = require "cjson.safe"

local M = { null = cjson.null }

local encode = cjson.encode
local find, gsub, match = string.find, string.gsub, string.match

if cjson.empty_array ~= nil then
  M.empty_array = cjson.empty_array
  M.encode = encode
  function M.fix(s) return s end
  M.MARK = "\0never\0"
else
  local SENTINEL = "\0lbatch:empty-array\0"
  local ENCODED = encode(SENTINEL)            -- "\u0000lbatch:empty-array\u0000"
  local SEARCH = ENCODED:sub(2, 8)            -- starts with a backslash: rare in JSON
  local PATTERN = ENCODED:gsub("%p", "%%%0")
  M.empty_array = SENTINEL
  M.MARK = SEARCH   -- find(s, MARK, 1, true): s may hold a marker for fix()
  -- fix(s): cjson's output with the empty-array markers made []
  function M.fix(s)
    if find(s, SEARCH, 1, true) then s = gsub(s, PATTERN, "[]") end
    return s
  end
  function M.encode(v) return M.fix(encode(v)) end
end

--- lua-cjson's decode (raises on invalid JSON; `null` is `json.null`).
M.decode = cjson.decode

--- `t`, written as a JSON array even when it is empty.
-- @tparam table t a list
-- @return t, or the empty-array marker
function M.array(t)
  if next(t) == nil then return M.empty_array end
  return t
end

local null = cjson.null
local tointeger = math.tointeger or function(v) return v end

--- Make a decoded value what Lua code expects, in place: JSON `null` as
-- nil (so `if batch.output_file_id then` means what it says) and whole
-- numbers as integers on Lua 5.3 and later (lua-cjson 2.1.0 decodes
-- every number as a float).
-- @tparam table t a decoded object or array
-- @treturn table t
function M.normalize(t)
  for k, v in pairs(t) do
    if v == null then t[k] = nil
    elseif type(v) == "table" then M.normalize(v)
    elseif type(v) == "number" then t[k] = tointeger(v) or v end
  end
  return t
end

local safe_decode = safe.decode

--- Decode a JSON object (not an array, not a scalar), nulls left in.
-- @tparam string s the text
-- @return the table, or nil and why
function M.object(s)
  if not match(s, "^%s*{") then return nil, "not a JSON object" end
  local v, why = safe_decode(s)
  if type(v) ~= "table" then return nil, why or "not a JSON object" end
  return v
end

return M
