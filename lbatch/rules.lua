--- The service's rules for a batch input file, in one place.
--
-- Used by the emulator (to fail a batch the way the service does), by
-- `jsonl.validate` (to check a file before it is uploaded) and by the
-- `lbatch.jsonl` writer. Pure Lua plus lua-cjson, so it also loads in nginx.
-- The numbers are `lbatch.service`'s.
-- @module lbatch.rules
local cjson = require "cjson"
local service = require "lbatch.service"

local LIMITS, TEST = service.LIMITS, service.TEST
local M = {}

local decode = cjson.decode
local find, sub, format = string.find, string.sub, string.format

--- Iterate the lines of an open file in blocks, so a file with a huge line
-- (or none at all) never sits whole in memory. Yields n, text, bytes where
-- text is nil when the line is longer than max_line bytes (its bytes are
-- still counted). A final line without "\n" counts; "\r\n" is accepted.
-- A read error raises its message.
function M.lines(fh, max_line)
  max_line = max_line or LIMITS.max_line_bytes
  local buf, pos, n, done = "", 1, 0, false
  local parts, plen, over = {}, 0, false
  return function()
    while true do
      local nl = find(buf, "\n", pos, true)
      if nl then
        local piece = sub(buf, pos, nl - 1)
        pos = nl + 1
        local bytes = plen + #piece
        local text
        if not over and bytes <= max_line then
          if plen > 0 then
            parts[#parts + 1] = piece
            text = table.concat(parts)
          else
            text = piece
          end
        end
        parts, plen, over = {}, 0, false
        n = n + 1
        -- LuaJIT interns every string with a hash of a few sampled bytes:
        -- request lines that differ only in the middle share a chain, and
        -- dead lines stay in it until swept. A little GC work now and then
        -- keeps those chains short (measured: 2x on 50,000 similar lines).
        if n % 1024 == 0 then collectgarbage("step", 64) end
        if text and sub(text, -1) == "\r" then text = sub(text, 1, -2) end
        return n, text, bytes + 1
      end
      -- no newline in what is buffered: keep the rest and read on
      local rest = sub(buf, pos)
      if #rest > 0 then
        plen = plen + #rest
        if over or plen > max_line then
          over, parts = true, {}
        else
          parts[#parts + 1] = rest
        end
      end
      buf, pos = "", 1
      if done then
        if plen == 0 then return nil end
        local text = not over and table.concat(parts) or nil
        local bytes = plen
        parts, plen, over = {}, 0, false
        n = n + 1
        return n, text, bytes
      end
      local chunk, err = fh:read(65536)
      if chunk then buf = chunk
      elseif err then error(err, 0)    -- a read error (a directory): callers pcall
      else done = true end
    end
  end
end

--- A problem: `{code, line, message, param}`.
-- @tparam string code
-- @tparam ?integer line
-- @tparam string message
-- @tparam ?string param
-- @treturn table
local function problem(code, line, message, param)
  return { code = code, line = line, message = message, param = param }
end
M.problem = problem

local Checker = {}
Checker.__index = Checker

--- A checker of one input file, line after line.
-- Each check appends its problems (`{code, line, message, param}`) to
-- `out` and returns it; `finish` adds the file-level ones.
-- @tparam[opt] table opts endpoint (the batch's; default: the first
-- line's url), max_lines, max_bytes
-- @treturn table the checker
function M.checker(opts)
  opts = opts or {}
  return setmetatable({
    endpoint = opts.endpoint, seen = {}, lines = 0, bytes = 0,
    model = nil, thinking = nil, test = false,
    max_lines = opts.max_lines or LIMITS.max_lines,
    max_bytes = opts.max_bytes or LIMITS.max_bytes,
  }, Checker)
end

--- Check a decoded request `{custom_id, method, url, body}`.
-- @tparam integer n its line number
-- @param req the decoded line
-- @tparam[opt] table out the list to add problems to
-- @treturn table out
function Checker:request(n, req, out)
  out = out or {}
  if type(req) ~= "table" then
    out[#out + 1] = problem("invalid_request", n, "Line is not a JSON object.", nil)
    return out
  end
  local id = req.custom_id
  if type(id) ~= "string" or id == "" then
    out[#out + 1] = problem("missing_custom_id", n, "custom_id is missing or not a non-empty string.", "custom_id")
  elseif self.seen[id] then
    out[#out + 1] = problem("duplicate_custom_id", n,
      format("custom_id %q is also used on line %d.", id, self.seen[id]), "custom_id")
  else
    self.seen[id] = n
  end
  if req.method ~= "POST" then
    out[#out + 1] = problem("invalid_method", n, "method must be \"POST\".", "method")
  end
  local url = req.url
  if type(url) ~= "string" or not service.ENDPOINTS[url] then
    out[#out + 1] = problem("invalid_url", n, format("url %s is not a supported endpoint.",
      type(url) == "string" and format("%q", url) or "is missing or"), "url")
  elseif self.endpoint == nil then
    self.endpoint = url
  elseif url ~= self.endpoint then
    out[#out + 1] = problem("mismatched_url", n,
      format("url %q differs from the batch endpoint %q.", url, self.endpoint), "url")
  end
  local body = req.body
  if type(body) ~= "table" then
    out[#out + 1] = problem("invalid_body", n, "body is missing or not a JSON object.", "body")
    return out
  end
  local model = body.model
  if type(model) ~= "string" or model == "" then
    out[#out + 1] = problem("missing_model", n, "body.model is missing.", "body.model")
  elseif self.model == nil then
    self.model = model
    self.test = model == TEST.model
  elseif model ~= self.model then
    out[#out + 1] = problem("mismatched_model", n,
      format("model %q differs from %q used earlier in the file; use one model per file.", model, self.model),
      "body.model")
  end
  local thinking = body.enable_thinking
  if thinking == nil or thinking == cjson.null then thinking = false end
  if self.thinking == nil then
    self.thinking = thinking
  elseif thinking ~= self.thinking then
    out[#out + 1] = problem("mismatched_thinking", n,
      "enable_thinking differs from earlier lines; use one thinking mode per file.", "body.enable_thinking")
  end
  if model == TEST.model and url ~= TEST.url then
    out[#out + 1] = problem("test_model_url", n,
      format("batch-test-model requests must use url %q.", TEST.url), "url")
  end
  return out
end

--- Check one raw line.
-- @tparam integer n its line number
-- @tparam ?string text the line (nil when it was too long to keep)
-- @tparam integer bytes its size, newline included
-- @tparam[opt] table out the list to add problems to
-- @treturn table out
function Checker:line(n, text, bytes, out)
  out = out or {}
  self.lines = n
  self.bytes = self.bytes + bytes
  if n == self.max_lines + 1 then
    out[#out + 1] = problem("too_many_lines", n,
      format("The file has more than %d lines.", self.max_lines), nil)
  end
  if text == nil or bytes - 1 > LIMITS.max_line_bytes then
    out[#out + 1] = problem("line_too_large", n,
      format("Line is larger than %d bytes.", LIMITS.max_line_bytes), nil)
    return out
  end
  if find(text, "^%s*$") then
    out[#out + 1] = problem("empty_line", n, "Line is empty.", nil)
    return out
  end
  local ok, req = pcall(decode, text)
  if not ok then
    out[#out + 1] = problem("invalid_json", n, "Line is not valid JSON.", nil)
    return out
  end
  return self:request(n, req, out)
end

--- The file-level problems (empty, too large, test-model limits).
-- @tparam[opt] table out the list to add problems to
-- @treturn table out
function Checker:finish(out)
  out = out or {}
  if self.lines == 0 then
    out[#out + 1] = problem("empty_file", nil, "The file is empty.", nil)
  end
  if self.bytes > self.max_bytes then
    out[#out + 1] = problem("file_too_large", nil,
      format("The file is larger than %d bytes.", self.max_bytes), nil)
  end
  if self.test then
    if self.lines > TEST.max_lines then
      out[#out + 1] = problem("test_model_too_many_lines", nil,
        format("A batch-test-model file has at most %d lines.", TEST.max_lines), nil)
    end
    if self.bytes > TEST.max_bytes then
      out[#out + 1] = problem("test_model_file_too_large", nil,
        format("A batch-test-model file is at most %d bytes.", TEST.max_bytes), nil)
    end
  end
  return out
end

return M
