--- The service's rules for a batch input file, in one place.
--
-- Used by the emulator (to fail a batch the way the service does), by
-- `jsonl.validate` (to check a file before it is uploaded) and by the
-- `lbatch.jsonl` writer. Pure Lua plus lua-cjson, so it also loads in nginx.
-- The numbers are `lbatch.service`'s.
-- @module lbatch.impl.formats.rules
local cjson = require "cjson"
local service = require "lbatch.impl.api.service"

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

-- each endpoint's own field, and those that must be a non-empty array
local FIELD, ALSO, NONEMPTY, null = {}, {}, { messages = true }, cjson.null
for url, ep in pairs(service.ENDPOINT_RULES) do FIELD[url], ALSO[url] = ep.field, ep.also end

--- An endpoint's own field, as `rule.field` checks it: its name (nil when
-- the endpoint has none) and whether it must be a non-empty array (else
-- present and not null). The writer's C encoder passes a body of that
-- shape without asking `rule.field` again, unless the third value says
-- the endpoint has other fields `rule.field` checks (images/edits' image).
-- @tparam string url
-- @treturn ?string
-- @treturn boolean
-- @treturn boolean
function M.field_of(url)
  local field = FIELD[url]
  return field, NONEMPTY[field] == true, ALSO[url] ~= nil
end

-- ------------------------------------------------------------ the rules

--- The rules, one function each: the one place that decides a rule and
-- words its message. Each returns nothing when the rule holds, else
-- `code, message, param`. The checker and the `lbatch.jsonl` writer both
-- call these, so they cannot disagree about a line.
-- @table rule
local rule = {}
M.rule = rule

--- custom_id: a non-empty string.
-- @param id
function rule.custom_id(id)
  if type(id) ~= "string" or id == "" then
    return "missing_custom_id", "custom_id is missing or not a non-empty string.", "custom_id"
  end
end

--- A custom_id seen before, at line `first` (of the file `where`, when it
-- is another one).
-- @tparam string id
-- @tparam integer first the line it was first on
-- @tparam[opt] string where the other file
function rule.duplicate(id, first, where)
  return "duplicate_custom_id", format("The custom_id %q is a duplicate of line %d%s.", id, first,
    where and (" of " .. where) or ""), "custom_id"
end

--- method: POST.
-- @param method
function rule.method(method)
  if method ~= "POST" then return "invalid_method", "method must be \"POST\".", "method" end
end

--- url: one of the profile's endpoints.
-- @param url
-- @tparam table profile a profile of `lbatch.service`
function rule.url(url, profile)
  if not (type(url) == "string" and profile.endpoints[url]) then
    return "url_not_found", format("The provided url '%s' is not supported by the Batch API.",
      type(url) == "string" and url or tostring(url)), "url"
  end
end

--- url: the batch's endpoint, when there is one.
-- @tparam string url
-- @tparam ?string endpoint
function rule.endpoint(url, endpoint)
  if endpoint ~= nil and url ~= endpoint then
    return "url_mismatch", format("The url '%s' does not match the batch's endpoint '%s'.", url, endpoint), "url"
  end
end

--- body: a JSON object.
-- @param body
function rule.body(body)
  if type(body) ~= "table" then return "invalid_body", "body is missing or not a JSON object.", "body" end
end

--- body: one that can be written as JSON (a Lua table can hold a function).
-- @tparam string why lua-cjson's reason
function rule.unencodable(why)
  return "invalid_body", "body cannot be encoded as JSON: " .. tostring(why), "body"
end

--- body.model: a non-empty string (moderations may leave it out).
-- @param model
-- @tparam ?string url a known endpoint
function rule.model(model, url)
  if type(model) ~= "string" or model == "" then
    local ep = url and service.ENDPOINT_RULES[url]
    if not (ep and ep.model_optional and model == nil) then
      return "missing_model", "body.model is missing.", "body.model"
    end
  end
end

--- body.model: the same in every line of a file.
-- @tparam string model
-- @tparam string first the file's model
function rule.same_model(model, first)
  if model ~= first then
    return "model_mismatch", format("The model %q differs from %q used earlier in the file; use one model per file.",
      model, first), "body.model"
  end
end

--- The thinking mode: the same in every line of a file.
-- @tparam boolean thinking this line's
-- @tparam boolean first the file's
-- @tparam integer first_line the line it was set by
function rule.same_thinking(thinking, first, first_line)
  if thinking ~= first then
    return "mismatched_thinking", format(
      "This request runs with thinking %s and line %d with thinking %s (enable_thinking, or the model's default); "
      .. "use one thinking mode per file.", thinking and "on" or "off", first_line, first and "on" or "off"),
      "body.enable_thinking"
  end
end

--- The test model goes to its own url.
-- @param model
-- @param url
function rule.test_url(model, url)
  if model == TEST.model and url ~= TEST.url then
    return "mismatched_test_url", format("The provided URL '%s' does not match the test model '%s'.",
      tostring(url), TEST.model), "url"
  end
end

local function missing(url, field)
  return "missing_field", format("A %s request needs body.%s.", url, field), "body." .. field
end

--- The endpoint's own fields (messages: a non-empty array).
-- @tparam string url a known endpoint
-- @tparam table body
function rule.field(url, body)
  local field = FIELD[url]
  if not field then return end
  local v = body[field]
  if v == nil or v == null then return missing(url, field) end
  if NONEMPTY[field] and (type(v) ~= "table" or next(v) == nil) then
    return "missing_field", format("body.%s must be a non-empty array.", field), "body." .. field
  end
  for _, other in ipairs(ALSO[url] or {}) do
    if body[other] == nil or body[other] == null then return missing(url, other) end
  end
end

--- Embedding models on /v1/embeddings, and only there.
-- @tparam string url a known endpoint
-- @param model
function rule.model_endpoint(url, model)
  if type(model) ~= "string" then return end
  if url == "/v1/embeddings" then
    if not service.is_embedding_model(model) and model ~= TEST.model then
      return "model_endpoint_mismatch",
        format("The model %q is not an embedding model; /v1/embeddings needs one.", model), "body.model"
    end
  elseif service.is_embedding_model(model) then
    return "model_endpoint_mismatch",
      format("The embedding model %q belongs on /v1/embeddings, not %s.", model, url), "body.model"
  end
end

--- At most `max` embedding inputs in a batch.
-- @tparam integer count the inputs so far, this line's included
-- @tparam integer max
function rule.inputs(count, max)
  if count > max then
    return "too_many_inputs", format("The batch has more than %d embedding inputs.", max), "body.input"
  end
end

--- A line: at most `max_line` bytes (its newline not counted).
-- @tparam integer size
-- @tparam integer max_line
function rule.line_size(size, max_line)
  if size > max_line then return "line_too_large", format("The line is larger than %d bytes.", max_line) end
end

--- At most `max_lines` requests in a file.
-- @tparam integer n the line number
-- @tparam integer max_lines
function rule.lines(n, max_lines)
  if n > max_lines then return "too_many_tasks", format("The file has more than %d requests.", max_lines) end
end

--- The first line: no UTF-8 byte-order mark, where the profile refuses
-- one (Azure fails such a file with a misleading message: azure-ai-docs
-- how-to/batch.md, troubleshooting).
-- @tparam ?string text the first line
-- @tparam table profile
function rule.bom(text, profile)
  if profile.no_bom and text and text:sub(1, 3) == "\239\187\191" then
    return "utf8_bom", format("The file starts with a UTF-8 byte-order mark, which %s refuses: save it without one.",
      profile.name), nil
  end
end

--- A file: at most `max_bytes`.
-- @tparam integer bytes
-- @tparam integer max_bytes
function rule.file_size(bytes, max_bytes)
  if bytes > max_bytes then return "file_too_large", format("The file is larger than %d bytes.", max_bytes) end
end

--- A batch-test-model file: at most TEST.max_lines lines.
-- @tparam integer lines
function rule.test_lines(lines)
  if lines > TEST.max_lines then
    return "test_model_too_many_lines", format("A batch-test-model file has at most %d lines.", TEST.max_lines)
  end
end

--- A batch-test-model file: at most TEST.max_bytes.
-- @tparam integer bytes
function rule.test_bytes(bytes)
  if bytes > TEST.max_bytes then
    return "test_model_file_too_large", format("A batch-test-model file is at most %d bytes.", TEST.max_bytes)
  end
end

--- Valid UTF-8; the fourth value is the offset of the first bad byte.
-- @tparam string text
function rule.utf8(text)
  local bad = utf8_bad(text)
  if bad then return "invalid_utf8", format("This line is not valid UTF-8 (byte %d).", bad), nil, bad end
end

--- A raw line's own rules, in order: its size, not empty, UTF-8, JSON, an
-- object. Returns the decoded request, or nil and `code, message, param,
-- offset`.
-- @tparam ?string text the line without its newline (nil: too long to keep)
-- @tparam integer size its bytes without the newline
-- @tparam integer max_line
function rule.raw(text, size, max_line)
  local code, message, param, offset
  if text == nil then code, message = rule.line_size(math.max(size, max_line + 1), max_line)
  else code, message = rule.line_size(size, max_line) end
  if code then return nil, code, message end
  if find(text, "^%s*$") then return nil, "empty_line", "This line is empty." end
  code, message, param, offset = rule.utf8(text)
  if code then return nil, code, message, param, offset end
  local ok, req = pcall(decode, text)
  if not ok then return nil, "invalid_json_line", "This line is not parseable as valid JSON." end
  if type(req) ~= "table" or not find(text, "^%s*{") then   -- a scalar, or an array
    return nil, "invalid_json_line", "This line is not a JSON object."
  end
  return req
end

-- ------------------------------------------------------------ the checker

local function add(out, n, code, message, param)
  if code then out[#out + 1] = problem(code, n, message, param) end
  return code
end

--- Check a request body's own rules: the endpoint's field, the model on
-- the right endpoint and in the region's list, the embedding inputs.
-- @tparam integer n its line number
-- @tparam string url its endpoint
-- @tparam table body the body
-- @tparam table out the list to add problems to
function Checker:body(n, url, body, out)
  local model = body.model
  add(out, n, rule.field(url, body))
  add(out, n, rule.model_endpoint(url, model))
  if type(model) == "string" and self.region and not self.warned[model] then
    local ok, list = service.serves(self.region, url, model)
    if not ok then
      self.warned[model] = true
      self.warnings[#self.warnings + 1] = problem("unknown_model", n, format(
        "The model %q is not in the %s region's batch list for %s (%s); lists change, so this is a warning.",
        model, self.region, url, #list > 0 and table.concat(list, ", ") or "none"), "body.model")
    end
  end
  if url == "/v1/embeddings" and self.profile.max_embedding_inputs then
    local input = body.input
    self.inputs = self.inputs + (type(input) == "table" and #input or 1)
    if not self.over_inputs and add(out, n, rule.inputs(self.inputs, self.profile.max_embedding_inputs)) then
      self.over_inputs = true
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
  if not add(out, n, rule.custom_id(id)) then
    if self.seen[id] then add(out, n, rule.duplicate(id, self.seen[id]))
    else self.seen[id] = n end
  end
  add(out, n, rule.method(req.method))
  local url = req.url
  local known = not add(out, n, rule.url(url, self.profile))
  if known then
    if self.endpoint == nil then self.endpoint = url
    else add(out, n, rule.endpoint(url, self.endpoint)) end
  end
  local body = req.body
  if add(out, n, rule.body(body)) then return out end
  local model = body.model
  if not add(out, n, rule.model(model, known and url or nil)) and type(model) == "string" then
    if self.model == nil then
      self.model = model
      self.test = model == TEST.model
    else
      add(out, n, rule.same_model(model, self.model))
    end
  end
  local thinking = service.thinking(body)
  if self.thinking == nil then
    self.thinking, self.thinking_line = thinking, n
  else
    add(out, n, rule.same_thinking(thinking, self.thinking, self.thinking_line))
  end
  add(out, n, rule.test_url(model, url))
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
  if n == self.max_lines + 1 then add(out, n, rule.lines(n, self.max_lines)) end
  if n == 1 and add(out, n, rule.bom(text, self.profile)) then return out end
  local req, code, message, param, offset = rule.raw(text, bytes - 1, self.profile.max_line_bytes)
  if not req then
    local p = problem(code, n, message, param)
    p.offset = offset
    out[#out + 1] = p
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
  add(out, nil, rule.file_size(self.bytes, self.max_bytes))
  if self.test then
    add(out, nil, rule.test_lines(self.lines))
    add(out, nil, rule.test_bytes(self.bytes))
  end
  return out
end

return M
