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

-- UTF-8: the core's scanner when it is loaded, else (inside nginx without
-- it) Lua 5.3's utf8.len, else no check
local utf8_bad
do
  local ok, core = pcall(require, "lbatch.core")
  if ok and core.utf8_check then utf8_bad = core.utf8_check
  elseif utf8 and utf8.len then
    utf8_bad = function(s)
      local n, at = utf8.len(s)
      if not n then return at end
    end
  else
    utf8_bad = function() return nil end
  end
end
M.utf8_bad = utf8_bad

--- A checker of one input file, line after line.
-- Each check appends its problems (`{code, line, message, param}`) to
-- `out` and returns it; `finish` adds the file-level ones. Warnings (a
-- model outside the region's list: lists change) go to `checker.warnings`.
-- @tparam[opt] table opts endpoint (the batch's; default: the first
-- line's url), limits (a profile of `lbatch.service`, or its name; default
-- `dashscope`), region (`cn`, `intl`: warn about models outside its list),
-- max_lines, max_bytes
-- @treturn table the checker
function M.checker(opts)
  opts = opts or {}
  local profile = type(opts.limits) == "table" and opts.limits or service.profile(opts.limits) or LIMITS
  return setmetatable({
    endpoint = opts.endpoint, seen = {}, lines = 0, bytes = 0, profile = profile, region = opts.region,
    model = nil, thinking = nil, test = false, inputs = 0, warnings = {}, warned = {},
    max_lines = math.min(opts.max_lines or profile.max_lines, profile.max_lines),
    max_bytes = math.min(opts.max_bytes or profile.max_bytes, profile.max_bytes),
  }, Checker)
end

local function present(v) return v ~= nil and v ~= cjson.null end

--- Check a request body's own rules: the endpoint's field, the model on
-- the right endpoint and in the region's list, the embedding inputs.
-- @tparam integer n its line number
-- @tparam string url its endpoint
-- @tparam table body the body
-- @tparam table out the list to add problems to
function Checker:body(n, url, body, out)
  local rule = service.ENDPOINT_RULES[url]
  local model = body.model
  if rule and rule.field and not present(body[rule.field]) then
    out[#out + 1] = problem("missing_field", n,
      format("A %s request needs body.%s.", url, rule.field), "body." .. rule.field)
  elseif url == "/v1/chat/completions" or url == "/v1/chat/ds-test" then
    local m = body.messages
    if type(m) ~= "table" or next(m) == nil then
      out[#out + 1] = problem("missing_field", n, "body.messages must be a non-empty array.", "body.messages")
    end
  end
  if type(model) == "string" then
    if url == "/v1/embeddings" and not service.is_embedding_model(model) and model ~= TEST.model then
      out[#out + 1] = problem("model_endpoint_mismatch", n,
        format("The model %q is not an embedding model; /v1/embeddings needs one.", model), "body.model")
    elseif url ~= "/v1/embeddings" and service.is_embedding_model(model) then
      out[#out + 1] = problem("model_endpoint_mismatch", n,
        format("The embedding model %q belongs on /v1/embeddings, not %s.", model, url), "body.model")
    end
    if self.region and not self.warned[model] then
      local ok, list = service.serves(self.region, url, model)
      if not ok then
        self.warned[model] = true
        self.warnings[#self.warnings + 1] = problem("unknown_model", n, format(
          "The model %q is not in the %s region's batch list for %s (%s); lists change, so this is a warning.",
          model, self.region, url, #list > 0 and table.concat(list, ", ") or "none"), "body.model")
      end
    end
  end
  if url == "/v1/embeddings" and self.profile.max_embedding_inputs then
    local input = body.input
    self.inputs = self.inputs + (type(input) == "table" and #input or 1)
    if self.inputs > self.profile.max_embedding_inputs and not self.over_inputs then
      self.over_inputs = true
      out[#out + 1] = problem("too_many_inputs", n, format(
        "The batch has more than %d embedding inputs.", self.profile.max_embedding_inputs), "body.input")
    end
  end
end

--- Check a decoded request `{custom_id, method, url, body}`.
-- @tparam integer n its line number
-- @param req the decoded line
-- @tparam[opt] table out the list to add problems to
-- @treturn table out
function Checker:request(n, req, out)
  out = out or {}
  if type(req) ~= "table" then
    out[#out + 1] = problem("invalid_json_line", n, "This line is not a JSON object.", nil)
    return out
  end
  local id = req.custom_id
  if type(id) ~= "string" or id == "" then
    out[#out + 1] = problem("missing_custom_id", n, "custom_id is missing or not a non-empty string.", "custom_id")
  elseif self.seen[id] then
    out[#out + 1] = problem("duplicate_custom_id", n,
      format("The custom_id %q is a duplicate of line %d.", id, self.seen[id]), "custom_id")
  else
    self.seen[id] = n
  end
  if req.method ~= "POST" then
    out[#out + 1] = problem("invalid_method", n, "method must be \"POST\".", "method")
  end
  local url = req.url
  local known = type(url) == "string" and self.profile.endpoints[url]
  if not known then
    out[#out + 1] = problem("url_not_found", n, format("The provided url '%s' is not supported by the Batch API.",
      type(url) == "string" and url or tostring(url)), "url")
  elseif self.endpoint == nil then
    self.endpoint = url
  elseif url ~= self.endpoint then
    out[#out + 1] = problem("url_mismatch", n,
      format("The url '%s' does not match the batch's endpoint '%s'.", url, self.endpoint), "url")
  end
  local body = req.body
  if type(body) ~= "table" then
    out[#out + 1] = problem("invalid_body", n, "body is missing or not a JSON object.", "body")
    return out
  end
  local model = body.model
  local rule = known and service.ENDPOINT_RULES[url]
  if type(model) ~= "string" or model == "" then
    if not (rule and rule.model_optional and model == nil) then
      out[#out + 1] = problem("missing_model", n, "body.model is missing.", "body.model")
    end
  elseif self.model == nil then
    self.model = model
    self.test = model == TEST.model
  elseif model ~= self.model then
    out[#out + 1] = problem("model_mismatch", n,
      format("The model %q differs from %q used earlier in the file; use one model per file.", model, self.model),
      "body.model")
  end
  local thinking = service.thinking(body)
  if self.thinking == nil then
    self.thinking, self.thinking_line = thinking, n
  elseif thinking ~= self.thinking then
    out[#out + 1] = problem("mismatched_thinking", n, format(
      "This request runs with thinking %s and line %d with thinking %s (enable_thinking, or the model's default); "
      .. "use one thinking mode per file.", thinking and "on" or "off", self.thinking_line,
      self.thinking and "on" or "off"), "body.enable_thinking")
  end
  if model == TEST.model and url ~= TEST.url then
    out[#out + 1] = problem("mismatched_test_url", n, format(
      "The provided URL '%s' does not match the test model '%s'.", tostring(url), TEST.model), "url")
  end
  if known then self:body(n, url, body, out) end
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
  local max_line = self.profile.max_line_bytes
  if n == self.max_lines + 1 then
    out[#out + 1] = problem("too_many_tasks", n,
      format("The file has more than %d requests.", self.max_lines), nil)
  end
  if text == nil or bytes - 1 > max_line then
    out[#out + 1] = problem("line_too_large", n,
      format("The line is larger than %d bytes.", max_line), nil)
    return out
  end
  if find(text, "^%s*$") then
    out[#out + 1] = problem("empty_line", n, "This line is empty.", nil)
    return out
  end
  local bad = utf8_bad(text)
  if bad then
    local p = problem("invalid_utf8", n, format("This line is not valid UTF-8 (byte %d).", bad), nil)
    p.offset = bad
    out[#out + 1] = p
    return out
  end
  local ok, req = pcall(decode, text)
  if not ok then
    out[#out + 1] = problem("invalid_json_line", n, "This line is not parseable as valid JSON.", nil)
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
