--- The one error contract.
--
-- Every runtime failure of every public function returns `nil, err`, and
-- `err` is an error object: a table with the fields below and a one-line
-- `tostring(err)`. Programming errors (a wrong argument type) raise a string
-- `lbatch.<function>: <what is wrong>` instead.
--
--    kind        http | network | timeout | decode | invalid | io | cancelled | task | config
--    status      the HTTP status, when there was an answer
--    code        a short machine-readable code (the service's, curl_N, ...)
--    message     what went wrong, for people
--    param       the parameter or field at fault
--    request_id  the service's request id, when it gave one
--    retryable   true when the same call may succeed later
--
-- @module lbatch.impl.transport.errors
local M = {}

local Error = {}
Error.__index = Error

local function str(v)
  if v == nil then return nil end
  return type(v) == "string" and v or tostring(v)
end

-- the kinds whose text shows the HTTP status: the answer is the failure
-- (a local file's "io" on a 200 download is not an answer's fault)
local STATUS_KINDS = { http = true, decode = true }

function Error.__tostring(e)
  local parts = { "lbatch:", str(e.kind) }
  if e.status and e.status ~= 0 and STATUS_KINDS[e.kind] then parts[#parts + 1] = ("%d"):format(e.status) end
  if e.code and e.code ~= "" and e.code ~= e.kind then parts[#parts + 1] = str(e.code) end
  local s = table.concat(parts, " ") .. ": " .. (str(e.message) or "error")
  if e.param then s = s .. " (param " .. str(e.param) .. ")" end
  if e.request_id then s = s .. " [request_id " .. str(e.request_id) .. "]" end
  return (s:gsub("[%c]+", " "))
end

--- The kinds of error (a set).
-- `http`: the service answered with an error status; `network`: no usable
-- answer (connection, TLS, proxy, a cut transfer); `timeout`: a time limit
-- passed; `decode`: an answer that is not what the API promises; `invalid`:
-- input that breaks a rule (a request line, an option value, a usage
-- error); `io`: a local file (path and reason in the message; never
-- retryable); `cancelled`: a task or transfer was cancelled; `task`: a task
-- raised something that is not an error object (`err.traceback` has where);
-- `config`: what the environment lacks (no API key found); `busy`: a work
-- directory held by another run (code `dir_locked`, lbatch.lock); `canary`:
-- a run's canary failed its check (code `canary_failed`, lbatch.pipeline).
M.KINDS = { http = true, network = true, timeout = true, decode = true, invalid = true,
            io = true, cancelled = true, task = true, config = true, busy = true, canary = true }

local STRING_FIELDS = { "code", "message", "param", "type", "request_id" }

--- Make an error object.
-- @tparam table fields kind (required), message, status, code, param,
-- request_id, retryable, and anything else to carry (custom_id, batch, ...).
-- `code`, `param`, `type` and `request_id` are kept only as strings (a
-- number becomes its text; a table is dropped).
-- @treturn table the error object
function M.new(fields)
  if not M.KINDS[fields.kind] then error("lbatch.errors.new: unknown kind " .. tostring(fields.kind), 2) end
  for _, k in ipairs(STRING_FIELDS) do
    local v = fields[k]
    local t = type(v)
    if t == "number" then fields[k] = v == math.floor(v) and v < 2^53 and v > -2^53 and ("%d"):format(v) or tostring(v)
    elseif t == "boolean" then fields[k] = tostring(v)
    elseif t ~= "string" then fields[k] = nil end
  end
  if fields.message == nil then fields.message = fields.kind .. " error" end
  fields.retryable = fields.retryable == true
  return setmetatable(fields, Error)
end

--- A local file failure: `kind = "io"`, never retryable.
-- @tparam string what what was being done ("cannot read", "cannot rename ... to")
-- @tparam string path the file
-- @param reason the system's reason (io.open's message, strerror)
-- @treturn table the error object
function M.io(what, path, reason)
  reason = reason and tostring(reason) or "failed"
  -- io.open's message already starts with the path
  local p = tostring(path)
  if reason:sub(1, #p + 2) == p .. ": " then reason = reason:sub(#p + 3) end
  return M.new({ kind = "io", path = p,
                 message = ("%s %s: %s"):format(what, p, reason) })
end

--- Is `x` an error object?
-- @param x anything
-- @treturn boolean
function M.is(x) return getmetatable(x) == Error end

-- ------------------------------------------------------------ raises into returns

-- A failure thrown by `throw` or `try`: a box, so that `protect` tells it
-- from a programming error (a string, or anything else raised).
local Thrown = {}

--- `e` boxed as `throw` raises it, to be raised later and elsewhere
-- (`error(errors.thrown(box), 0)`).
-- @param e any value
-- @treturn table the box
function M.box(e) return setmetatable({ e }, Thrown) end

--- Throw `e` to the nearest `protect`ed function, which returns `nil, e`.
-- @param e the error (an error object, or any value a protected
-- function returns as its second result)
function M.throw(e) error(M.box(e), 0) end

--- `v, ...` when `v` is neither nil nor false; else throw `e` (as
-- luasocket's `try`): `local f = errors.try(client:upload(path))`.
-- @param v a value
-- @param e its error
-- @return v and the rest
function M.try(v, e, ...)
  if v == nil or v == false then M.throw(e) end
  return v, e, ...
end

--- The value `throw` or `try` threw, when `x` is what a pcall caught from
-- one of them; else nil.
-- @param x a raised value
-- @return the thrown value, or nil
function M.thrown(x)
  if getmetatable(x) == Thrown then return x[1] end
end

local function protected(ok, ...)
  if ok then return ... end
  local x = ...
  if getmetatable(x) == Thrown then return nil, x[1] end
  error(x, 0)             -- a programming error goes on up
end

--- `fn` made to return `nil, e` for what it throws (`throw`, `try`), as
-- luasocket's `protect`; anything else it raises goes on up.
-- @tparam function fn
-- @treturn function
function M.protect(fn)
  return function(...) return protected(pcall(fn, ...)) end
end

-- ------------------------------------------------------------ programming errors

--- Raise a programming error `lbatch.<fn>: <msg>` at the caller of the
-- public function.
-- @tparam string fn the public function's name, e.g. `"jsonl.writer"`
-- @tparam string msg what is wrong
-- @tparam[opt=3] integer level the stack level to blame
function M.arg(fn, msg, level)
  error("lbatch." .. fn .. ": " .. msg, level or 3)
end

--- Check an argument's type, raising `lbatch.<fn>: <name> must be a <want>`.
-- @tparam string fn the public function's name
-- @tparam string name the argument's name
-- @param v its value
-- @tparam string want the Lua type it must have
-- @tparam[opt] boolean optional nil is allowed
-- @treturn the value
function M.check(fn, name, v, want, optional)
  if v == nil and optional then return v end
  if type(v) ~= want then
    error(("lbatch.%s: %s must be a %s (got %s)"):format(fn, name, want, type(v)), 3)
  end
  return v
end

-- ------------------------------------------------------------ secrets

-- The shortest piece of a secret that is scrubbed wherever it appears: a
-- server that echoes part of a key (or a message cut inside it) must not
-- reveal most of it.
local FRAGMENT = 8

local find, sub = string.find, string.sub

-- every piece of `secret` of FRAGMENT bytes or more in `s` becomes "***"
local function scrub_one(s, secret)
  local n = #secret
  local w = n < FRAGMENT and n or FRAGMENT
  if w < 4 then return s end
  local i = 1
  while i <= n - w + 1 do
    local piece = sub(secret, i, i + w - 1)
    local a = find(s, piece, 1, true)
    if a then
      -- grow the match both ways along the secret
      local b = a + w - 1
      local j, k = i, i + w - 1
      while j > 1 and a > 1 and sub(s, a - 1, a - 1) == sub(secret, j - 1, j - 1) do a, j = a - 1, j - 1 end
      while k < n and sub(s, b + 1, b + 1) == sub(secret, k + 1, k + 1) do b, k = b + 1, k + 1 end
      s = sub(s, 1, a - 1) .. "***" .. sub(s, b + 1)
    else
      i = i + 1
    end
  end
  return s
end

--- A scrubber for secrets: `scrub(s)` returns `s` with every piece of 8
-- bytes or more of any secret replaced by `***`.
-- @tparam {string,...} secrets the secrets (API key, credentials)
-- @treturn function scrub(s) -> s
function M.scrubber(secrets)
  local list = {}
  for _, s in ipairs(secrets) do
    if type(s) == "string" and #s >= 4 then list[#list + 1] = s end
  end
  return function(s)
    if type(s) ~= "string" then return s end
    for _, secret in ipairs(list) do s = scrub_one(s, secret) end
    return s
  end
end

--- Scrub every string field of an error object in place.
-- @tparam table err the error object
-- @tparam function scrub a scrubber
-- @treturn table err
function M.scrub(err, scrub)
  for k, v in pairs(err) do
    if type(v) == "string" then err[k] = scrub(v) end
  end
  return err
end

return M
