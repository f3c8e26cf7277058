-- Error objects: a table with kind, status, code, message, param,
-- request_id and retryable, printed on one line by tostring().
local M = {}

local Error = {}
Error.__index = Error

function Error.__tostring(e)
  local parts = { "lbatch:", e.kind }
  if e.status and e.status ~= 0 then parts[#parts + 1] = tostring(math.floor(e.status)) end
  if e.code and e.code ~= "" then parts[#parts + 1] = tostring(e.code) end
  local s = table.concat(parts, " ") .. ": " .. tostring(e.message or "error")
  if e.param then s = s .. " (param " .. tostring(e.param) .. ")" end
  if e.request_id then s = s .. " [request_id " .. tostring(e.request_id) .. "]" end
  return (s:gsub("[\r\n]+", " "))
end

M.KINDS = { http = true, network = true, timeout = true, decode = true, invalid = true, cancelled = true }

-- new{kind=, message=, ...}; `secret`, when given, is scrubbed from the
-- message so an API key echoed by a server never reaches a log.
function M.new(fields, secret)
  assert(M.KINDS[fields.kind], "unknown error kind")
  if secret and secret ~= "" and type(fields.message) == "string" then
    local s, i = fields.message, 1
    while true do
      local a, b = s:find(secret, i, true)
      if not a then break end
      s = s:sub(1, a - 1) .. "***" .. s:sub(b + 1)
      i = a + 3
    end
    fields.message = s
  end
  fields.retryable = fields.retryable or false
  return setmetatable(fields, Error)
end

function M.is(x) return getmetatable(x) == Error end

return M
