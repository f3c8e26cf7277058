-- JSON for request lines: lua-cjson, plus empty arrays.
--
-- lua-cjson writes an empty Lua table as {}. Newer builds (OpenResty's
-- lua-cjson 2.1.0.x) have cjson.empty_array; Debian's 2.1.0 does not, so
-- there json.empty_array is a sentinel string that encode() turns into []
-- after cjson has run: one plain string search per line, no tree walk.
local cjson = require "cjson"

local M = { null = cjson.null }

local encode, decode = cjson.encode, cjson.decode
local find, gsub = string.find, string.gsub

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

M.decode = decode

-- array(t): t, written as a JSON array even when it is empty
function M.array(t)
  if next(t) == nil then return M.empty_array end
  return t
end

return M
