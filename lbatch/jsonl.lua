--- Request files: a writer that enforces the service's rules line by line
-- and shards, a validator for files made elsewhere, and multimodal helpers.
--
--    local w = jsonl.writer{ path = "out/requests.jsonl", model = "qwen-plus" }
--    assert(w:chat("q1", { prompt = "2 + 2 = ?", system = "Answer briefly." }))
--    local manifest = assert(w:close())   -- {files = {{path, lines, bytes, model, endpoint}}, lines, bytes}
-- @module lbatch.jsonl
local json = require "lbatch.json"
local rules = require "lbatch.rules"
local errors = require "lbatch.errors"
local service = require "lbatch.service"
local idmap = require("lbatch.core").idmap   -- custom_id sets outside the Lua heap
local put = idmap().put

local cjson_encode, fix, MARK, find = require("cjson").encode, json.fix, json.MARK, string.find
local safe_encode = require("cjson.safe").encode   -- nil, err instead of raising: no pcall per line
local safe_decode = require("cjson.safe").decode
local TEST = service.TEST
local TEST_MODEL, TEST_URL, RULES, thinking_of = TEST.model, TEST.url, service.ENDPOINT_RULES, service.thinking
local utf8_bad = rules.utf8_bad
local M = {}

-- a line is written in pieces: L1 id L2 url L3 body L4
local L1, L2, L3, L4 = '{"custom_id":', ',"method":"POST","url":"', '","body":', "}\n"
local FIXED = #L1 + #L2 + #L3 + #L4

local function invalid(id, code, message, param)
  return errors.new({ kind = "invalid", code = code, param = param, custom_id = id,
    message = ("custom_id %s: %s"):format(id == nil and "(none)" or ("%q"):format(tostring(id)), message) })
end

-- ------------------------------------------------------------ writer

local Writer = {}
Writer.__index = Writer

--- A writer of request files.
-- Files are opened as requests come; a file that cannot be written makes
-- `add` return nil and an `io` error.
-- @tparam table opts path (a template: the first file is path, the next
-- path-2, path-3, ...), endpoint (all requests; default by helper: chat,
-- embeddings, ds-test), model (default for the helpers), limits (a
-- profile name of `lbatch.service`: `dashscope` (default),
-- `dashscope-strict`, `openai`, or a region), max_lines, max_bytes (only
-- lower than the profile's), unique = "file" (the service's rule) or
-- "all" (every file)
-- @treturn table the writer
function M.writer(opts)
  errors.check("jsonl.writer", "opts", opts, "table")
  errors.check("jsonl.writer", "opts.path", opts.path, "string")
  local profile = service.profile(opts.limits)
  if not profile then errors.arg("jsonl.writer", "limits must be dashscope, dashscope-strict or openai") end
  if opts.endpoint ~= nil and not profile.endpoints[opts.endpoint] then
    local list = {}
    for url in pairs(profile.endpoints) do list[#list + 1] = url end
    table.sort(list)
    errors.arg("jsonl.writer", ("endpoint must be one of %s"):format(table.concat(list, ", ")))
  end
  local stem, ext = opts.path:match("^(.-)(%.[^./]*)$")
  return setmetatable({
    stem = stem or opts.path, ext = ext or "", profile = profile,
    endpoint = opts.endpoint, model = opts.model,
    max_lines = math.min(opts.max_lines or profile.max_lines, profile.max_lines),
    max_bytes = math.min(opts.max_bytes or profile.max_bytes, profile.max_bytes),
    unique_all = opts.unique == "all", seen = opts.unique == "all" and idmap() or nil,
    routes = {},    -- (model, url, thinking) -> {url, test, file: the current file}
    files = {},     -- manifest entries, in the order files were started
  }, Writer)
end

function Writer:_start(route)
  local test = route.test
  local n = #self.files + 1
  local path = n == 1 and (self.stem .. self.ext) or (self.stem .. "-" .. n .. self.ext)
  local fh, msg = io.open(path, "wb")
  if not fh then return nil, errors.io("cannot write", path, msg) end
  fh:setvbuf("full", 1024 * 1024)
  local max_lines = test and math.min(self.max_lines, TEST.max_lines) or self.max_lines
  local f = {
    path = path, lines = 0, bytes = 0, model = route.model, endpoint = route.url,
    fh = fh, seen = self.seen or idmap(),
    max_lines = max_lines,
    max_bytes = test and math.min(self.max_bytes, TEST.max_bytes) or self.max_bytes,
  }
  self.files[n] = f
  route.file = f
  return f
end

-- a finished file keeps only its manifest entry: its custom_ids go.
-- Returns nil and an io error when its last writes failed (a full disk).
local function close_file(f, shared)
  local err
  if f.fh then
    local ok, msg = f.fh:close()
    if not ok then err = errors.io("cannot write", f.path, msg) end
    f.fh = nil
  end
  if f.seen and f.seen ~= shared then f.seen:clear() end
  f.seen = nil
  if err then return nil, err end
  return true
end

-- The shard for a request: checks that depend only on model and url, done
-- once per (model, url, thinking mode) and cached for the next request.
function Writer:_route(id, model, url, thinking)
  local test = model == TEST_MODEL
  local resolved = url or self.endpoint or (test and TEST_URL) or "/v1/chat/completions"
  if self.endpoint and resolved ~= self.endpoint then
    return nil, invalid(id, "url_mismatch",
      ("url %q differs from the writer's endpoint %q"):format(resolved, self.endpoint), "url")
  end
  if not self.profile.endpoints[resolved] then
    return nil, invalid(id, "url_not_found", ("url %q is not supported by the Batch API (%s)")
      :format(resolved, self.profile.name), "url")
  end
  if test and resolved ~= TEST_URL then
    return nil, invalid(id, "mismatched_test_url", "batch-test-model requests must use " .. TEST_URL, "url")
  end
  local embedding = service.is_embedding_model(model)
  if not test and (resolved == "/v1/embeddings") ~= embedding then
    return nil, invalid(id, "model_endpoint_mismatch", embedding
      and ("the embedding model %q belongs on /v1/embeddings"):format(model)
      or ("%q is not an embedding model; /v1/embeddings needs one"):format(model), "body.model")
  end
  local key = model .. "\0" .. resolved .. (thinking and "\0t" or "")
  local route = self.routes[key]
  if not route then
    route = { key = key, model = model, url = resolved, test = test, rule = RULES[resolved] }
    self.routes[key] = route
  end
  self.last_model, self.last_url, self.last_thinking, self.last_route = model, url, thinking, route
  return route
end

--- Add one request.
-- @tparam string id the custom_id (a number is taken as its text)
-- @tparam table body the request body
-- @tparam[opt] string url the endpoint (default: the writer's)
-- @return true, or nil and an error that names the custom_id and the rule
-- (`invalid`) or the file (`io`)
function Writer:add(id, body, url)
  if type(body) ~= "table" then errors.arg("jsonl.add", "body must be a table") end
  local tid = type(id)
  if tid ~= "string" then
    if tid ~= "number" then errors.arg("jsonl.add", "custom_id must be a string") end
    id = tostring(id)
  end
  if id == "" then return nil, invalid(id, "missing_custom_id", "custom_id is empty", "custom_id") end
  local model = body.model
  if type(model) ~= "string" or model == "" then
    local rule = RULES[url or self.endpoint or ""]
    if model ~= nil or not (rule and rule.model_optional) then
      return nil, invalid(id, "missing_model", "body.model is missing", "body.model")
    end
    model = ""                 -- moderations: the service's default model
  end
  local thinking = thinking_of(body)
  local route = self.last_route
  if model ~= self.last_model or url ~= self.last_url or thinking ~= self.last_thinking or not route then
    local err
    route, err = self:_route(id, model, url, thinking)
    if not route then return nil, err end
  end
  local field = route.rule.field
  if field then
    local v = body[field]
    if v == nil or (field == "messages" and (type(v) ~= "table" or next(v) == nil)) then
      return nil, invalid(id, "missing_field", ("a %s request needs body.%s"):format(route.url, field),
        "body." .. field)
    end
  end
  local encoded, why = safe_encode(body)
  if not encoded then
    return nil, invalid(id, "invalid_body", "body cannot be encoded as JSON: " .. tostring(why), "body")
  end
  local bad = utf8_bad(encoded) or utf8_bad(id)
  if bad then
    return nil, invalid(id, "invalid_utf8", "the request is not valid UTF-8 (a string holds a bad byte)", "body")
  end
  if find(encoded, MARK, 1, true) then encoded = fix(encoded) end
  local eid = cjson_encode(id)   -- a string never holds the empty-array marker
  local rurl = route.url
  local size = FIXED + #eid + #rurl + #encoded
  if size - 1 > self.profile.max_line_bytes then
    return nil, invalid(id, "line_too_large", ("the line is %d bytes, over the %d allowed (%s)")
      :format(size - 1, self.profile.max_line_bytes, self.profile.name))
  end
  local f = route.file
  if not f or f.lines >= f.max_lines or f.bytes + size > f.max_bytes then
    if f then
      local ok, err = close_file(f, self.seen)
      if not ok then return nil, err end
    end
    if self.seen and self.seen:get(id) then
      return nil, invalid(id, "duplicate_custom_id", "custom_id is used twice", "custom_id")
    end
    if route.test and size > math.min(self.max_bytes, TEST.max_bytes) then
      return nil, invalid(id, "test_model_file_too_large", "the line alone is over the test model's 1 MB")
    end
    local err
    f, err = self:_start(route)
    if not f then return nil, err end
  end
  if not put(f.seen, id) then
    return nil, invalid(id, "duplicate_custom_id", "custom_id is used twice", "custom_id")
  end
  if not f.fh:write(L1, eid, L2, rurl, L3, encoded, L4) then
    return nil, errors.io("cannot write", f.path, "write failed")
  end
  f.lines, f.bytes = f.lines + 1, f.bytes + size
  return true
end

local function copy_extra(body, opts, skip)
  for k, v in pairs(opts) do
    if not skip[k] then body[k] = v end
  end
  return body
end

local CHAT_SKIP = { prompt = true, system = true, messages = true, images = true }

--- Add a chat request.
-- @tparam string id the custom_id
-- @tparam table opts prompt, system, images (paths or URLs), messages,
-- model, and any other body field (temperature, enable_thinking, ...)
-- @return true, or nil and an error
function Writer:chat(id, opts)
  errors.check("jsonl.chat", "opts", opts, "table")
  local messages = opts.messages
  if not messages then
    messages = {}
    if opts.system then messages[1] = { role = "system", content = opts.system } end
    local content = opts.prompt
    if opts.images then
      content = { { type = "text", text = opts.prompt or "" } }
      for _, src in ipairs(opts.images) do
        local url, err = M.data_url(src)
        if not url then
          err.custom_id, err.param = id, "images"
          err.message = ("custom_id %q: %s"):format(tostring(id), err.message)
          return nil, err
        end
        content[#content + 1] = { type = "image_url", image_url = { url = url } }
      end
    end
    messages[#messages + 1] = { role = "user", content = content }
  end
  local body = copy_extra({ model = opts.model or self.model, messages = messages }, opts, CHAT_SKIP)
  return self:add(id, body)
end

--- Add an embedding request.
-- @tparam string id the custom_id
-- @tparam table opts input, model, dimensions, and any other body field
-- @return true, or nil and an error
function Writer:embedding(id, opts)
  errors.check("jsonl.embedding", "opts", opts, "table")
  local body = copy_extra({ model = opts.model or self.model }, opts, {})
  return self:add(id, body, self.endpoint or "/v1/embeddings")
end

--- Add a request for the free test model (`batch-test-model` on `/v1/chat/ds-test`).
-- @tparam string id the custom_id
-- @tparam[opt] string prompt
-- @return true, or nil and an error
function Writer:test(id, prompt)
  return self:add(id, { model = TEST_MODEL, messages = { { role = "user", content = prompt or "test" } } },
    TEST_URL)
end

--- Add a line built elsewhere.
-- @tparam table req `{custom_id, method, url, body}`
-- @return true, or nil and an error
function Writer:request(req)
  errors.check("jsonl.request", "req", req, "table")
  if req.method ~= "POST" then
    return nil, invalid(req.custom_id, "invalid_method", "method must be POST", "method")
  end
  if type(req.body) ~= "table" then
    return nil, invalid(req.custom_id, "invalid_body", "body is missing or not an object", "body")
  end
  return self:add(req.custom_id or "", req.body, req.url)
end

--- Close every file.
-- @treturn table the manifest `{files = {{path, lines, bytes, model,
-- endpoint}}, lines, bytes}`, or nil and an `io` error (a full disk)
function Writer:close()
  local files, lines, bytes, failure = {}, 0, 0, nil
  for i, f in ipairs(self.files) do
    local ok, err = close_file(f, self.seen)
    failure = failure or (not ok and err)
    files[i] = { path = f.path, lines = f.lines, bytes = f.bytes, model = f.model, endpoint = f.endpoint }
    lines, bytes = lines + f.lines, bytes + f.bytes
  end
  if self.seen then self.seen:clear() end
  self.routes, self.last_route = {}, nil
  if failure then return nil, failure end
  return { files = files, lines = lines, bytes = bytes }
end

-- ------------------------------------------------------------ validate

--- Every problem of a file made elsewhere, with line numbers and the
-- service's codes, read in blocks (never whole).
-- @tparam string path
-- @tparam[opt] table opts endpoint (the batch's), limits (a profile name;
-- default `dashscope`), region (`cn`, `intl`: models outside its list are
-- warnings)
-- @treturn table the report `{ok, problems = {{code, line, message,
-- param}}, warnings, lines, bytes, model, endpoint, thinking}`, or nil and an `io` error
function M.validate(path, opts)
  errors.check("jsonl.validate", "path", path, "string")
  errors.check("jsonl.validate", "opts", opts, "table", true)
  opts = opts or {}
  local profile = service.profile(opts.limits)
  if not profile then errors.arg("jsonl.validate", "limits must be dashscope, dashscope-strict or openai") end
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  local chk = rules.checker({ endpoint = opts.endpoint, limits = profile, region = opts.region })
  local problems = {}
  local ok, rerr = pcall(function()
    for n, text, bytes in rules.lines(fh, profile.max_line_bytes) do chk:line(n, text, bytes, problems) end
  end)
  fh:close()
  if not ok then return nil, errors.io("cannot read", path, rerr) end
  chk:finish(problems)
  return { ok = #problems == 0, problems = problems, warnings = chk.warnings, lines = chk.lines, bytes = chk.bytes,
           model = chk.model, endpoint = chk.endpoint, thinking = chk.thinking }
end

-- ------------------------------------------------------------ estimate

-- UTF-8 sequences counted as one token each: CJK symbols and punctuation,
-- kana, CJK ideographs (U+3000-U+9FFF), Hangul syllables (U+AC00-U+D7FF),
-- compatibility ideographs (U+F900-U+FAFF), fullwidth forms (U+FF00-U+FFEF)
-- and the supplementary ideographs (U+20000-U+3FFFF)
local CJK = {
  "[\227-\233][\128-\191][\128-\191]", "\234[\176-\191][\128-\191]", "[\235\236][\128-\191][\128-\191]",
  "\237[\128-\159][\128-\191]", "\239[\164-\171][\128-\191]", "\239[\188-\191][\128-\191]",
  "\240[\160-\191][\128-\191][\128-\191]",
}
local gsub = string.gsub

-- add a string's characters to m: cjk (CJK characters), other (the rest)
local function count_text(m, s)
  if type(s) ~= "string" or s == "" then return end
  local cont = select(2, gsub(s, "[\128-\191]", ""))   -- UTF-8 continuation bytes
  local chars, cjk = #s - cont, 0
  if cont > 0 then
    for _, p in ipairs(CJK) do cjk = cjk + select(2, gsub(s, p, "")) end
  end
  m.cjk_chars, m.other_chars = m.cjk_chars + cjk, m.other_chars + chars - cjk
end

-- a message's content: a string, or a list of parts ({type = "text", text})
local function count_content(m, content)
  if type(content) == "string" then return count_text(m, content) end
  if type(content) ~= "table" then return end
  for _, part in ipairs(content) do
    if type(part) == "string" then count_text(m, part)
    elseif type(part) == "table" then count_text(m, part.text) end
  end
end

-- the text a request sends: messages' content, input (a string, a list of
-- strings, or of messages), prompt (a string or a list of strings)
local function count_body(m, body)
  if type(body.messages) == "table" then
    for _, msg in ipairs(body.messages) do
      if type(msg) == "table" then count_content(m, msg.content) end
    end
  end
  for _, field in ipairs({ "input", "prompt" }) do
    local v = body[field]
    if type(v) == "string" then count_text(m, v)
    elseif type(v) == "table" then
      for _, item in ipairs(v) do
        if type(item) == "table" then count_content(m, item.content ~= nil and item.content or { item })
        else count_text(m, item) end
      end
    end
  end
end

-- endpoints that answer without output tokens
local NO_OUTPUT = { ["/v1/embeddings"] = true, ["/v1/moderations"] = true }
local MAX_OUTPUT = { "max_tokens", "max_completion_tokens", "max_output_tokens" }

-- the prices table checked: prices, or nil and an invalid error
local function check_prices(prices, name)
  local function bad(msg)
    return nil, errors.new({ kind = "invalid", code = "invalid_prices", param = "prices",
      message = ("prices %s: %s"):format(name, msg) })
  end
  if type(prices) ~= "table" then return bad("must be a JSON object of models") end
  for model, p in pairs(prices) do
    if type(model) ~= "string" then return bad("must be a JSON object of models, not a list") end
    if type(p) ~= "table" then return bad(("%q must be an object {\"input\": P, \"output\": P}"):format(model)) end
    for _, k in ipairs({ "input", "output" }) do
      local v = p[k]
      if v ~= nil and v ~= json.null and (type(v) ~= "number" or v ~= v or v < 0 or v == math.huge) then
        return bad(("%q.%s must be a number (currency units per million tokens)"):format(model, k))
      end
    end
    if type(p.input) ~= "number" and type(p.output) ~= "number" then
      return bad(("%q has neither an input nor an output price"):format(model))
    end
  end
  return prices
end

--- The method of `estimate`'s token counts, in words.
M.ESTIMATE_METHOD = "input tokens are approximate: 1 per CJK character, 1 per 4 other characters "
  .. "(rounded up per model); output tokens are at most the sum of max_tokens (or max_completion_tokens, "
  .. "max_output_tokens)"

--- Estimate request files before they are sent: requests per model and
-- endpoint, approximate input tokens, the most output tokens the requests
-- allow, and their cost at batch prices. Files are read line by line,
-- never whole.
--
-- Input tokens are approximate (`jsonl.ESTIMATE_METHOD`): a CJK character
-- counts 1, four other characters count 1, rounded up per model; the
-- text is the messages' content (strings and text parts), `input` and
-- `prompt`. The output bound is the sum of `max_tokens`,
-- `max_completion_tokens` or `max_output_tokens` (0 for embeddings and
-- moderations); it is known for a model when every request sets one.
-- @tparam {string,...} paths request files (or one path)
-- @tparam[opt] table opts prices (a table `{[model] = {input = P, output
-- = P}}` in currency units per million tokens at real-time prices, or the
-- path of a JSON file of it), discount (batch price / real-time price,
-- default 0.5)
-- @treturn table the estimate `{files = {{path, lines, requests, skipped}},
-- lines, requests, skipped, discount, priced, method, models = {[model] =
-- {requests, endpoints = {[url] = n}, cjk_chars, other_chars, input_tokens,
-- output_tokens_max, output_known, with_max_tokens, price, input_cost,
-- output_cost_max}}, totals = {input_tokens, output_tokens_max,
-- input_cost, output_cost_max, unpriced}}`; costs are at batch prices and nil
-- when unknown. Or nil and an `io` error (a file) or an `invalid` one (the
-- prices).
function M.estimate(paths, opts)
  if type(paths) == "string" then paths = { paths } end
  errors.check("jsonl.estimate", "paths", paths, "table")
  errors.check("jsonl.estimate", "opts", opts, "table", true)
  opts = opts or {}
  local discount = opts.discount == nil and 0.5 or opts.discount
  if type(discount) ~= "number" or discount ~= discount or discount < 0 then
    errors.arg("jsonl.estimate", "opts.discount must be a number from 0")
  end
  local prices = opts.prices
  if type(prices) == "string" then
    local fh, msg = io.open(prices, "rb")
    if not fh then return nil, errors.io("cannot read", prices, msg) end
    local text, rerr = fh:read("*a")
    fh:close()
    if not text then return nil, errors.io("cannot read", opts.prices, rerr) end
    local why
    prices, why = safe_decode(text)
    if prices == nil then
      return nil, errors.new({ kind = "invalid", code = "invalid_prices", param = "prices",
        message = ("prices %s: not JSON (%s)"):format(opts.prices, tostring(why)) })
    end
  end
  if prices ~= nil then
    local err
    prices, err = check_prices(prices, type(opts.prices) == "string" and opts.prices or "table")
    if not prices then return nil, err end
  end
  local max_line = 0
  for _, p in pairs(service.PROFILES) do max_line = math.max(max_line, p.max_line_bytes) end
  local rep = { files = {}, lines = 0, requests = 0, skipped = 0, models = {}, discount = discount,
                priced = prices ~= nil, method = M.ESTIMATE_METHOD }
  local models, decode = rep.models, safe_decode
  for i, path in ipairs(paths) do
    errors.check("jsonl.estimate", "paths[" .. i .. "]", path, "string")
    local fh, msg = io.open(path, "rb")
    if not fh then return nil, errors.io("cannot read", path, msg) end
    local f = { path = path, lines = 0, requests = 0, skipped = 0 }
    local ok, rerr = pcall(function()
      for n, text in rules.lines(fh, max_line) do
        f.lines = n
        local req = text and find(text, "%S") and decode(text)
        local body = type(req) == "table" and req.body
        if type(body) ~= "table" then
          if not text or find(text, "%S") then f.skipped = f.skipped + 1 end   -- not a request
        else
          local model = type(body.model) == "string" and body.model or "(default)"
          local url = type(req.url) == "string" and req.url or "(none)"
          local m = models[model]
          if not m then
            m = { requests = 0, endpoints = {}, cjk_chars = 0, other_chars = 0, output_tokens_max = 0,
                  with_max_tokens = 0 }
            models[model] = m
          end
          m.requests = m.requests + 1
          m.endpoints[url] = (m.endpoints[url] or 0) + 1
          count_body(m, body)
          if NO_OUTPUT[url] then
            m.with_max_tokens = m.with_max_tokens + 1
          else
            for _, k in ipairs(MAX_OUTPUT) do
              local v = body[k]
              if type(v) == "number" and v >= 0 then
                m.output_tokens_max = m.output_tokens_max + math.floor(v)
                m.with_max_tokens = m.with_max_tokens + 1
                break
              end
            end
          end
          f.requests = f.requests + 1
        end
      end
    end)
    fh:close()
    if not ok then return nil, errors.io("cannot read", path, rerr) end
    rep.files[i] = f
    rep.lines, rep.requests, rep.skipped = rep.lines + f.lines, rep.requests + f.requests, rep.skipped + f.skipped
  end
  local totals = { input_tokens = 0, output_tokens_max = 0, input_cost = prices and 0 or nil,
                   output_cost_max = prices and 0 or nil }
  local unpriced, all_known = {}, true
  for model, m in pairs(models) do
    m.input_tokens = m.cjk_chars + math.ceil(m.other_chars / 4)
    m.output_known = m.with_max_tokens == m.requests
    totals.input_tokens = totals.input_tokens + m.input_tokens
    totals.output_tokens_max = totals.output_tokens_max + m.output_tokens_max
    all_known = all_known and m.output_known
    local p = prices and prices[model]
    if prices and not p then unpriced[#unpriced + 1] = model end
    if p then
      m.price = { input = type(p.input) == "number" and p.input or nil,
                  output = type(p.output) == "number" and p.output or nil }
      if m.price.input then m.input_cost = m.input_tokens * m.price.input / 1e6 * discount end
      if m.output_known and (m.price.output or m.output_tokens_max == 0) then
        m.output_cost_max = m.output_tokens_max * (m.price.output or 0) / 1e6 * discount
      end
      totals.input_cost = m.input_cost and totals.input_cost and totals.input_cost + m.input_cost or nil
      totals.output_cost_max = m.output_cost_max and totals.output_cost_max
        and totals.output_cost_max + m.output_cost_max or nil
    end
  end
  if not all_known then totals.output_tokens_max = nil end
  if #unpriced > 0 then
    table.sort(unpriced)
    totals.unpriced, totals.input_cost, totals.output_cost_max = unpriced, nil, nil
  end
  rep.totals = totals
  return rep
end

-- ------------------------------------------------------------ multimodal

local MAGIC = {
  { "^\137PNG\r\n\26\n", "image/png" }, { "^\255\216\255", "image/jpeg" }, { "^GIF8[79]a", "image/gif" },
  { "^RIFF....WEBP", "image/webp" }, { "^BM", "image/bmp" }, { "^II%*%z", "image/tiff" },
  { "^MM%z%*", "image/tiff" }, { "^....ftypheic", "image/heic" }, { "^....ftyp", "video/mp4" },
}
local EXT = {
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp",
  bmp = "image/bmp", tif = "image/tiff", tiff = "image/tiff", heic = "image/heic", mp4 = "video/mp4",
}

--- The MIME type of a file, from its first bytes or else its extension.
-- @tparam string path
-- @tparam[opt] string head its first bytes
-- @treturn string
function M.mime_type(path, head)
  for _, m in ipairs(MAGIC) do
    if head and head:find(m[1]) then return m[2] end
  end
  return EXT[(path:match("%.(%w+)$") or ""):lower()] or "application/octet-stream"
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64T = {}
for i = 0, 63 do B64T[i] = B64:sub(i + 1, i + 1) end

local function base64(s)
  local out, n, byte, floor = {}, 0, string.byte, math.floor
  for i = 1, #s - 2, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a * 65536 + b * 256 + c
    n = n + 1
    out[n] = B64T[floor(v / 262144)] .. B64T[floor(v / 4096) % 64] .. B64T[floor(v / 64) % 64] .. B64T[v % 64]
  end
  local rest = #s % 3
  if rest > 0 then
    local a, b = byte(s, #s - rest + 1, #s)
    local v = a * 65536 + (b or 0) * 256
    n = n + 1
    out[n] = B64T[floor(v / 262144)] .. B64T[floor(v / 4096) % 64]
      .. (rest == 2 and B64T[floor(v / 64) % 64] or "=") .. "="
  end
  return table.concat(out)
end
M.base64 = base64

--- An http(s), oss or data: URL as it is; a local file (an image or a
-- video frame) as a data: URL with its MIME type.
-- @tparam string src a path or a URL
-- @treturn string the URL, or nil and an `io` error
function M.data_url(src)
  errors.check("jsonl.data_url", "src", src, "string")
  if src:find("^https?://") or src:find("^data:") or src:find("^oss://") then return src end
  local fh, msg = io.open(src, "rb")
  if not fh then return nil, errors.io("cannot read", src, msg) end
  local data, rerr = fh:read("*a")
  fh:close()
  if not data then return nil, errors.io("cannot read", src, rerr) end
  return "data:" .. M.mime_type(src, data:sub(1, 16)) .. ";base64," .. base64(data)
end

--- A content part `{type = "image_url", image_url = {url = ...}}`.
-- @tparam string src a path or a URL
-- @treturn table the part, or nil and an `io` error
function M.image(src)
  local url, err = M.data_url(src)
  if not url then return nil, err end
  return { type = "image_url", image_url = { url = url } }
end

return M
