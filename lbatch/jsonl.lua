--- Request files: a writer that enforces the service's rules line by line
-- and shards, and a validator for files made elsewhere. Both decide with
-- `lbatch.rules`, so they report a bad line with the same code and message.
-- `jsonl.estimate` (`lbatch.estimate`) and the multimodal helpers
-- (`lbatch.media`: `data_url`, `image`, ...) are here too.
--
--    local w = jsonl.writer{ path = "out/requests.jsonl", model = "qwen-plus" }
--    assert(w:chat("q1", { prompt = "2 + 2 = ?", system = "Answer briefly." }))
--    local manifest = assert(w:close())   -- {files = {{path, lines, bytes, model, endpoint}}, lines, bytes}
-- @module lbatch.jsonl
local json = require "lbatch.json"
local rules = require "lbatch.impl.formats.rules"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"
local core = require "lbatch.core"
local idmap = core.idmap   -- custom_id sets outside the Lua heap
local put = idmap().put
local encoder = core.encoder   -- the request line in one walk in C (enc.c)
local enc_put, enc_write, enc_arm, enc_sync, adder
do
  local e = encoder()
  enc_put, enc_write, enc_arm, enc_sync = e.put, e.write, e.arm, e.sync
  adder = function(slow) return e:adder(slow) end
end

local cjson_encode, fix, MARK, find = require("cjson").encode, json.fix, json.MARK, string.find
local safe_encode = require("cjson.safe").encode   -- nil, err instead of raising: no pcall per line
local media = require "lbatch.impl.formats.media"
local estimate = require "lbatch.impl.formats.estimate"
local TEST = service.TEST
local TEST_MODEL, TEST_URL, thinking_of = TEST.model, TEST.url, service.thinking
local R = rules.rule
local utf8_bad, line_size, custom_id, field = rules.utf8_bad, R.line_size, R.custom_id, R.field
local field_of = rules.field_of
local M = {}

-- a line is written in pieces: L1 id L2 url L3 body L4
local L1, L2, L3, L4 = '{"custom_id":', ',"method":"POST","url":"', '","body":', "}\n"
local FIXED = #L1 + #L2 + #L3 + #L4
-- a custom_id set maps an id to its line: file index * SPAN + line number
local SPAN = 2 ^ 26

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
  if not profile then errors.arg("jsonl.writer", "limits must be one of " .. service.profile_names()) end
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
    enc = encoder(type(json.empty_array) == "string" and json.empty_array or nil),
    max_line = profile.max_line_bytes, chat_url = profile.chat_url or "/v1/chat/completions",
    defaults = {},  -- model -> its thinking mode when the body does not say
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
    path = path, lines = 0, bytes = 0, inputs = 0, model = route.model, endpoint = route.url,
    index = n, tag = n * SPAN + 1, fh = fh, seen = self.seen or idmap(),   -- tag + lines: the next line's id value
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

-- The shard for a request: the rules that depend only on model and url,
-- decided once per (model, url, thinking mode) and cached for the next
-- request. A model on the wrong endpoint is kept in the route (`late`) and
-- reported after the body's field, in the checker's order.
function Writer:_route(id, model, url, thinking)
  local code, message, param = R.url(url, self.profile)
  if not code then code, message, param = R.endpoint(url, self.endpoint) end
  if not code then code, message, param = R.model(model, url) end
  if not code then code, message, param = R.test_url(model, url) end
  if code then return nil, invalid(id, code, message, param) end
  local name = model or ""                 -- moderations: the service's default model
  local key = name .. "\0" .. url .. (thinking and "\0t" or "")
  local route = self.routes[key]
  if not route then
    local lcode, lmessage, lparam = R.model_endpoint(url, model)
    route = { key = key, model = name, url = url, test = model == TEST_MODEL,
              late = lcode and { lcode, lmessage, lparam } or nil,
              max_inputs = url == "/v1/embeddings" and self.profile.max_embedding_inputs or nil }
    self.routes[key] = route
  end
  self.last_model, self.last_url, self.last_thinking, self.last_route = model, url, thinking, route
  return route
end

-- The C encoder's gate (enc:arm): the route of the line just written, with
-- what its rules decided, so that the next request of the same shape on
-- it (the same model, url and thinking mode, the endpoint's field there)
-- is written by enc:add alone; the gate keeps the file's lines and bytes
-- until _sync gives them back. Embedding routes (their inputs are counted
-- here) are not armed.
function Writer:_arm(route, f, model, url, thinking)
  if route.max_inputs or route.late or type(model) ~= "string" then return end
  local name, nonempty, more = field_of(url)
  if more then return end      -- fields the encoder does not check (images/edits' image)
  local default = self.endpoint or (model == TEST_MODEL and TEST_URL) or self.chat_url
  enc_arm(self.enc, { model = model, url = url, thinking = thinking, nil_ok = self.defaults[model] == thinking,
                      default_url = default == url, field = name, nonempty = nonempty, fh = f.fh, seen = f.seen,
                      tag = f.tag, lines = f.lines, bytes = f.bytes, max_lines = f.max_lines,
                      max_bytes = f.max_bytes, max_line = self.max_line })
  self.armed = f
end

-- the armed file's counters back in its table, the gate closed: the file
function Writer:_sync()
  local f = self.armed
  if f then
    f.lines, f.bytes = enc_sync(self.enc)
    self.armed = nil
  end
  return f
end

function Writer:_duplicate(id, v, current)
  local line = v % SPAN
  local index = (v - line) / SPAN
  local where = index ~= current and self.files[index] and self.files[index].path or nil
  return invalid(id, R.duplicate(id, line, where))
end

-- The body as JSON the Lua way (lua-cjson) and the line's own rules
-- (size, UTF-8, custom_id): encoded, eid, size; or nil and the error.
function Writer:_encode(id, body, url)
  local encoded, why = safe_encode(body)
  if not encoded then return nil, invalid(id, R.unencodable(why)) end
  if find(encoded, MARK, 1, true) then encoded = fix(encoded) end
  local eid = cjson_encode(id)   -- a string never holds the empty-array marker
  local size = FIXED + #eid + #url + #encoded
  local code, message = line_size(size - 1, self.max_line)
  if code then return nil, invalid(id, code, message) end
  if utf8_bad(encoded) or utf8_bad(eid) then   -- the line that would be written, as validate sees it
    return nil, invalid(id, R.utf8(L1 .. eid .. L2 .. url .. L3 .. encoded))
  end
  local param
  code, message, param = custom_id(id)
  if code then return nil, invalid(id, code, message, param) end
  return encoded, eid, size
end

-- nil and err, a rule of the request's; on a line not encoded yet, a rule
-- of the line's own comes first (the checker's order)
function Writer:_refuse(id, body, url, done, err)
  if not done then
    local ok, lerr = self:_encode(id, body, url)
    if not ok then return nil, lerr end
  end
  return nil, err
end

-- the request's thinking mode: its enable_thinking, else the model's
-- default (service.thinking, its answer by model kept here)
function Writer:_thinking(body, model)
  local thinking = body.enable_thinking
  if thinking ~= true and thinking ~= false then
    thinking = self.defaults[model]
    if thinking == nil then
      thinking = thinking_of(body)
      if type(model) == "string" then self.defaults[model] = thinking end
    end
  end
  return thinking
end

-- the route's file `f` full (or none yet): it is closed and the next one
-- started, once the line of `size` bytes is known to fit a file and its
-- id not to be in the closed ones; the new file, or nil and an error
function Writer:_next_file(route, f, id, size)
  if f then
    local ok, err = close_file(f, self.seen)
    if not ok then return nil, err end
  end
  local v = self.seen and self.seen:get(id)
  if v then return nil, self:_duplicate(id, v, nil) end
  local code, message
  if route.test then code, message = R.test_bytes(size) end
  if not code then code, message = R.file_size(size, self.max_bytes) end
  if code then return nil, invalid(id, code, message) end
  return self:_start(route)
end

-- Check and write one request: `raw` is the whole line (line, whose own
-- rules R.raw has checked); else the C encoder makes the line, checks it
-- and, when the file has room, writes it in one call (enc:put), and what
-- it leaves is encoded the Lua way. The rules are rules.rule's, in the
-- checker's order; the writer's own lines are not decoded again.
function Writer:_put(id, body, url, raw)
  if self.armed then self:_sync() end
  local model = body.model
  local encoded, eid, size, code, message, param
  if raw then size = #raw + 1 end
  local thinking = self:_thinking(body, model)
  local route = self.last_route
  if model ~= self.last_model or url ~= self.last_url or thinking ~= self.last_thinking or not route then
    local err
    route, err = self:_route(id, model, url, thinking)
    if not route then return self:_refuse(id, body, url, raw, err) end
  end
  code, message, param = field(url, body)
  if code then return self:_refuse(id, body, url, raw, invalid(id, code, message, param)) end
  local late = route.late
  if late then return self:_refuse(id, body, url, raw, invalid(id, late[1], late[2], late[3])) end
  local inputs = 0
  if route.max_inputs then
    local input = body.input
    inputs = type(input) == "table" and #input or 1
    code, message, param = R.inputs(inputs, route.max_inputs)
    if code then return self:_refuse(id, body, url, raw, invalid(id, code, message, param)) end
  end
  local f = route.file
  local full = not f or f.lines >= f.max_lines or (route.max_inputs and f.inputs + inputs > route.max_inputs)
  if not raw then
    local written, failed
    if full then size = enc_put(self.enc, id, url, body, self.max_line, nil, nil, 0, -1)
    else
      size, written, failed = enc_put(self.enc, id, url, body, self.max_line, f.fh, f.seen, f.tag + f.lines,
        f.max_bytes - f.bytes)
    end
    if written then
      f.lines, f.bytes = f.lines + 1, f.bytes + size
      if inputs > 0 then f.inputs = f.inputs + inputs end
      self:_arm(route, f, model, url, thinking)
      return true
    elseif written == false then return nil, self:_duplicate(id, f.seen:get(id), f.index)
    elseif failed then return nil, errors.io("cannot write", f.path, "write failed")
    elseif not size then                     -- left to lua-cjson and the Lua checks
      encoded, eid, size = self:_encode(id, body, url)
      if not encoded then return nil, eid end
    end
  end
  if full or f.bytes + size > f.max_bytes then
    local err
    f, err = self:_next_file(route, f, id, size)
    if not f then return nil, err end
  end
  local ok
  if encoded or raw then
    ok = put(f.seen, id, f.tag + f.lines)
    if ok then
      if raw then ok = f.fh:write(raw, "\n")
      else ok = f.fh:write(L1, eid, L2, url, L3, encoded, L4) end
    end
  else
    ok = enc_write(self.enc, f.fh, f.seen, id, f.tag + f.lines)
  end
  if ok == false then return nil, self:_duplicate(id, f.seen:get(id), f.index) end
  if not ok then return nil, errors.io("cannot write", f.path, "write failed") end
  f.lines, f.bytes, f.inputs = f.lines + 1, f.bytes + size, f.inputs + inputs
  if not raw then self:_arm(route, f, model, url, thinking) end
  return true
end

-- The method is enc:adder's C function: it writes the armed route's
-- common request itself and calls this for the others, `failed` true when
-- that request's write failed; so an argument error is raised at level 4.

--- Add one request.
-- @tparam string id the custom_id (a number is taken as its text)
-- @tparam table body the request body
-- @tparam[opt] string url the endpoint (default: the writer's)
-- @return true, or nil and an error that names the custom_id and the rule
-- (`invalid`: its code and message are `validate`'s for that line) or the
-- file (`io`)
-- @function Writer:add
Writer.add = adder(function(self, id, body, url, failed)
  if failed then return nil, errors.io("cannot write", self:_sync().path, "write failed") end
  if type(body) ~= "table" then errors.arg("jsonl.add", "body must be a table", 4) end
  local tid = type(id)
  if tid ~= "string" then
    if tid ~= "number" then errors.arg("jsonl.add", "custom_id must be a string", 4) end
    id = tostring(id)
  end
  return self:_put(id, body, url or self.endpoint or (body.model == TEST_MODEL and TEST_URL) or self.chat_url)
end)

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
        local url, err = media.data_url(src)
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

-- a decoded line's own fields, in the checker's order: nil, or the error
local function fields(self, req)
  local id = req.custom_id
  local code, message, param = custom_id(id)
  if not code then code, message, param = R.method(req.method) end
  if not code then code, message, param = R.url(req.url, self.profile) end
  if not code then code, message, param = R.endpoint(req.url, self.endpoint) end
  if not code then code, message, param = R.body(req.body) end
  if code then return invalid(id, code, message, param) end
end

--- Add a line built elsewhere.
-- @tparam table req `{custom_id, method, url, body}` (a number custom_id
-- is taken as its text)
-- @return true, or nil and an error
function Writer:request(req)
  errors.check("jsonl.request", "req", req, "table")
  if type(req.custom_id) == "number" then
    req = { custom_id = tostring(req.custom_id), method = req.method, url = req.url, body = req.body }
  end
  local err = fields(self, req)
  if err then return nil, err end
  return self:add(req.custom_id, req.body, req.url)
end

--- Add a line of JSON text as it is, byte for byte: the rules are
-- `validate`'s for that line (its size, UTF-8, JSON, then the request's),
-- with their codes and messages.
-- @tparam string text one line (a final newline is dropped)
-- @return true, or nil and an error
function Writer:line(text)
  errors.check("jsonl.line", "text", text, "string")
  text = text:gsub("\r?\n$", "", 1)
  if find(text, "\n", 1, true) then errors.arg("jsonl.line", "text must be one line") end
  local req, code, message, param = R.raw(text, #text, self.max_line)
  if not req then return nil, invalid(nil, code, message, param) end
  local err = fields(self, req)
  if err then return nil, err end
  return self:_put(req.custom_id, req.body, req.url, text)
end

--- The shard the last line written went to: its index in the manifest's
-- files (a flow tags each ask with it).
-- @treturn number the index, or nil before any line
function Writer:last_shard()
  local route = self.last_route
  return route and route.file and route.file.index
end

--- Close every file.
-- @treturn table the manifest `{files = {{path, lines, bytes, model,
-- endpoint}}, lines, bytes}`, or nil and an `io` error (a full disk)
function Writer:close()
  self:_sync()
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
  if not profile then errors.arg("jsonl.validate", "limits must be one of " .. service.profile_names()) end
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

-- ------------------------------------------------------------ moved

--- `lbatch.estimate`'s `files`: estimate request files before they are sent.
-- @function estimate
M.estimate = estimate.files
--- `lbatch.estimate`'s `METHOD`: how the token counts are made.
M.ESTIMATE_METHOD = estimate.METHOD
--- `lbatch.media`'s: a path or URL as a URL (a local file as a data: URL).
-- @function data_url
M.data_url = media.data_url
--- `lbatch.media`'s: a content part for an image.
-- @function image
M.image = media.image
--- `lbatch.media`'s: a file's MIME type.
-- @function mime_type
M.mime_type = media.mime_type
--- `lbatch.media`'s: base64.
-- @function base64
M.base64 = media.base64

return M
