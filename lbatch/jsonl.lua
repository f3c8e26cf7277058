-- Request files: a writer that enforces the service's rules line by line and
-- shards, a validator for files made elsewhere, and multimodal helpers.
--
--   local w = jsonl.writer{ path = "out/requests.jsonl", model = "qwen-plus" }
--   assert(w:chat("q1", { prompt = "2 + 2 = ?", system = "Answer briefly." }))
--   local manifest = w:close()   -- { files = {{path, lines, bytes, model, endpoint}}, lines, bytes }
local json = require "lbatch.json"
local rules = require "lbatch.rules"
local errors = require "lbatch.errors"
local idmap = require("lbatch.core").idmap   -- custom_id sets outside the Lua heap
local put = idmap().put

local cjson_encode, fix, MARK, find = require("cjson").encode, json.fix, json.MARK, string.find
local safe_encode = require("cjson.safe").encode   -- nil, err instead of raising: no pcall per line
local ENDPOINTS, TEST_MODEL, TEST_URL, MAX_LINE = rules.endpoints, rules.test_model, rules.test_url, rules.max_line_bytes
local M = {}

-- a line is written in pieces: L1 id L2 url L3 body L4
local L1, L2, L3, L4 = '{"custom_id":', ',"method":"POST","url":"', '","body":', "}\n"
local FIXED = #L1 + #L2 + #L3 + #L4

local function invalid(id, code, message, param)
  return errors.new({ kind = "invalid", code = code, param = param, custom_id = id,
    message = ("custom_id %s: %s"):format(id == nil and "(none)" or ("%q"):format(tostring(id)), message) })
end

------------------------------------------------------------------ writer

local Writer = {}
Writer.__index = Writer

-- opts: path (template: the first file is path, the next path-2, path-3, ...),
-- endpoint (all requests; default by helper: chat, embeddings, ds-test),
-- model (default for the helpers), max_lines, max_bytes (only lower than the
-- service's), unique = "file" (the service's rule) or "all" (every file).
function M.writer(opts)
  if type(opts) ~= "table" or type(opts.path) ~= "string" then
    error("jsonl.writer: opts.path (a string) is required", 2)
  end
  if opts.endpoint ~= nil and not rules.endpoints[opts.endpoint] then
    error("jsonl.writer: endpoint must be /v1/chat/completions, /v1/embeddings or /v1/chat/ds-test", 2)
  end
  local stem, ext = opts.path:match("^(.-)(%.[^./]*)$")
  return setmetatable({
    stem = stem or opts.path, ext = ext or "",
    endpoint = opts.endpoint, model = opts.model,
    max_lines = math.min(opts.max_lines or rules.max_lines, rules.max_lines),
    max_bytes = math.min(opts.max_bytes or rules.max_bytes, rules.max_bytes),
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
  if not fh then error("jsonl.writer: cannot write " .. tostring(msg), 3) end
  fh:setvbuf("full", 1024 * 1024)
  local max_lines = test and math.min(self.max_lines, rules.test_max_lines) or self.max_lines
  local f = {
    path = path, lines = 0, bytes = 0, model = route.model, endpoint = route.url,
    fh = fh, seen = self.seen or idmap(),
    max_lines = max_lines,
    max_bytes = test and math.min(self.max_bytes, rules.test_max_bytes) or self.max_bytes,
  }
  self.files[n] = f
  route.file = f
  return f
end

-- a finished file keeps only its manifest entry: its custom_ids go
local function close_file(f, shared)
  if f.fh then f.fh:close() f.fh = nil end
  if f.seen and f.seen ~= shared then f.seen:clear() end
  f.seen = nil
end

-- The shard for a request: checks that depend only on model and url, done
-- once per (model, url, thinking mode) and cached for the next request.
function Writer:_route(id, model, url, thinking)
  local test = model == TEST_MODEL
  local resolved = url or self.endpoint or (test and TEST_URL) or "/v1/chat/completions"
  if self.endpoint and resolved ~= self.endpoint then
    return nil, invalid(id, "mismatched_url", ("url %q differs from the writer's endpoint %q"):format(resolved, self.endpoint), "url")
  end
  if not ENDPOINTS[resolved] then
    return nil, invalid(id, "invalid_url", ("url %q is not a supported endpoint"):format(resolved), "url")
  end
  if test and resolved ~= TEST_URL then
    return nil, invalid(id, "test_model_url", "batch-test-model requests must use " .. TEST_URL, "url")
  end
  local key = model .. "\0" .. resolved .. (thinking and "\0t" or "")
  local route = self.routes[key]
  if not route then
    route = { key = key, model = model, url = resolved, test = test }
    self.routes[key] = route
  end
  self.last_model, self.last_url, self.last_thinking, self.last_route = model, url, thinking, route
  return route
end

-- add(custom_id, body[, url]): one request. true, or nil and an error that
-- names the custom_id and the rule.
function Writer:add(id, body, url)
  if type(body) ~= "table" then error("jsonl.add: body must be a table", 2) end
  local tid = type(id)
  if tid ~= "string" then
    if tid ~= "number" then error("jsonl.add: custom_id must be a string", 2) end
    id = tostring(id)
  end
  if id == "" then return nil, invalid(id, "missing_custom_id", "custom_id is empty", "custom_id") end
  local model = body.model
  if type(model) ~= "string" or model == "" then
    return nil, invalid(id, "missing_model", "body.model is missing", "body.model")
  end
  local thinking = body.enable_thinking == true
  local route = self.last_route
  if model ~= self.last_model or url ~= self.last_url or thinking ~= self.last_thinking or not route then
    local err
    route, err = self:_route(id, model, url, thinking)
    if not route then return nil, err end
  end
  local encoded, why = safe_encode(body)
  if not encoded then
    return nil, invalid(id, "invalid_body", "body cannot be encoded as JSON: " .. tostring(why), "body")
  end
  if find(encoded, MARK, 1, true) then encoded = fix(encoded) end
  local eid = cjson_encode(id)   -- a string never holds the empty-array marker
  local rurl = route.url
  local size = FIXED + #eid + #rurl + #encoded
  if size - 1 > MAX_LINE then
    return nil, invalid(id, "line_too_large", ("the line is %d bytes, over 6 MB"):format(size - 1))
  end
  local f = route.file
  if not f or f.lines >= f.max_lines or f.bytes + size > f.max_bytes then
    if f then close_file(f, self.seen) end
    if self.seen and self.seen:get(id) then
      return nil, invalid(id, "duplicate_custom_id", "custom_id is used twice", "custom_id")
    end
    if route.test and size > math.min(self.max_bytes, rules.test_max_bytes) then
      return nil, invalid(id, "test_model_file_too_large", "the line alone is over the test model's 1 MB")
    end
    f = self:_start(route)
  end
  if not put(f.seen, id) then
    return nil, invalid(id, "duplicate_custom_id", "custom_id is used twice", "custom_id")
  end
  f.fh:write(L1, eid, L2, rurl, L3, encoded, L4)
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

-- chat(id, {prompt=, system=, images={...}, messages=, model=, ...params})
function Writer:chat(id, opts)
  if type(opts) ~= "table" then error("jsonl.chat: opts must be a table", 2) end
  local messages = opts.messages
  if not messages then
    messages = {}
    if opts.system then messages[1] = { role = "system", content = opts.system } end
    local content = opts.prompt
    if opts.images then
      content = { { type = "text", text = opts.prompt or "" } }
      for _, src in ipairs(opts.images) do
        local url, err = M.data_url(src)
        if not url then return nil, invalid(id, "invalid_image", err.message, "images") end
        content[#content + 1] = { type = "image_url", image_url = { url = url } }
      end
    end
    messages[#messages + 1] = { role = "user", content = content }
  end
  local body = copy_extra({ model = opts.model or self.model, messages = messages }, opts, CHAT_SKIP)
  return self:add(id, body)
end

-- embedding(id, {input=, model=, dimensions=, ...})
function Writer:embedding(id, opts)
  if type(opts) ~= "table" then error("jsonl.embedding: opts must be a table", 2) end
  local body = copy_extra({ model = opts.model or self.model }, opts, {})
  return self:add(id, body, self.endpoint or "/v1/embeddings")
end

-- test(id, prompt): a request for batch-test-model on /v1/chat/ds-test
function Writer:test(id, prompt)
  return self:add(id, { model = rules.test_model, messages = { { role = "user", content = prompt or "test" } } },
    rules.test_url)
end

-- request{custom_id, method, url, body}: a line built elsewhere
function Writer:request(req)
  if type(req) ~= "table" then error("jsonl.request: a table is expected", 2) end
  if req.method ~= "POST" then
    return nil, invalid(req.custom_id, "invalid_method", "method must be POST", "method")
  end
  if type(req.body) ~= "table" then
    return nil, invalid(req.custom_id, "invalid_body", "body is missing or not an object", "body")
  end
  return self:add(req.custom_id or "", req.body, req.url)
end

-- close(): the manifest {files = {{path, lines, bytes, model, endpoint}}, lines, bytes}
function Writer:close()
  local files, lines, bytes = {}, 0, 0
  for i, f in ipairs(self.files) do
    close_file(f, self.seen)
    files[i] = { path = f.path, lines = f.lines, bytes = f.bytes, model = f.model, endpoint = f.endpoint }
    lines, bytes = lines + f.lines, bytes + f.bytes
  end
  if self.seen then self.seen:clear() end
  self.routes, self.last_route = {}, nil
  return { files = files, lines = lines, bytes = bytes }
end

------------------------------------------------------------------ validate

-- validate(path[, {endpoint=}]): every problem of a file made elsewhere, with
-- line numbers and the emulator's codes, read in blocks. Returns a report
-- {ok, problems, lines, bytes, model, endpoint}, or nil, err.
function M.validate(path, opts)
  if type(path) ~= "string" then error("jsonl.validate: path must be a string", 2) end
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.new({ kind = "invalid", message = "cannot read " .. tostring(msg) }) end
  local chk = rules.checker({ endpoint = opts and opts.endpoint })
  local problems = {}
  for n, text, bytes in rules.lines(fh) do chk:line(n, text, bytes, problems) end
  fh:close()
  chk:finish(problems)
  return { ok = #problems == 0, problems = problems, lines = chk.lines, bytes = chk.bytes,
           model = chk.model, endpoint = chk.endpoint }
end

------------------------------------------------------------------ multimodal

local MAGIC = {
  { "^\137PNG\r\n\26\n", "image/png" }, { "^\255\216\255", "image/jpeg" }, { "^GIF8[79]a", "image/gif" },
  { "^RIFF....WEBP", "image/webp" }, { "^BM", "image/bmp" }, { "^II%*%z", "image/tiff" },
  { "^MM%z%*", "image/tiff" }, { "^....ftypheic", "image/heic" }, { "^....ftyp", "video/mp4" },
}
local EXT = {
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp",
  bmp = "image/bmp", tif = "image/tiff", tiff = "image/tiff", heic = "image/heic", mp4 = "video/mp4",
}

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

-- data_url(src): an http(s) or data: URL as it is; a local file (an image
-- or a video frame) as a data: URL with its MIME type.
function M.data_url(src)
  if type(src) ~= "string" then error("jsonl.data_url: a path or URL string is expected", 2) end
  if src:find("^https?://") or src:find("^data:") or src:find("^oss://") then return src end
  local fh, msg = io.open(src, "rb")
  if not fh then return nil, errors.new({ kind = "invalid", message = "cannot read " .. tostring(msg) }) end
  local data = fh:read("*a")
  fh:close()
  return "data:" .. M.mime_type(src, data:sub(1, 16)) .. ";base64," .. base64(data)
end

-- image(src): a content part {type = "image_url", image_url = {url = ...}}
function M.image(src)
  local url = assert(M.data_url(src))
  return { type = "image_url", image_url = { url = url } }
end

return M
