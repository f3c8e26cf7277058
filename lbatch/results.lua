--- Results: output and error files read together, one record per
-- request, optionally joined with the input files (then in input order,
-- with the requests that have no result at all). Streaming: one decoded
-- line at a time, never the whole file.
--
--    local r = assert(results.open{ output = "out.jsonl", errors = "err.jsonl", inputs = "in.jsonl" })
--    for rec, err in r:each() do
--      if not rec then error(err) end
--      print(rec.custom_id, rec.ok, rec.class, rec.content or rec.error_message)
--    end
--
-- A record is `ok` only with a 2xx `response.status_code`, a body (a
-- non-empty JSON object) and no error, in the line or in the body: the
-- services write lines with `error: null` and a 500 inside. Every other
-- record has a `class` (`results.classify`): `"retryable"`,
-- `"permanent"`, `"account"` or `"invalid_answer"`.
--
-- Joined with inputs, an ok answer to a request that asks for JSON
-- (`response_format` `json_object` or `json_schema`; the responses API's
-- `text.format`) is parsed (`rec.json`, the value) and held to the schema's
-- required fields and basic types (`lbatch.impl.formats.shape`): one that
-- is not JSON or not of that shape is not ok, class `"invalid_answer"`,
-- `rec.error` an error object (kind `decode`, code `invalid_answer`,
-- param the field) and `error_message` its message ("answer lacks required
-- field 'score'"). Without inputs the reader cannot know what a request
-- asked for, and makes no such check.
-- @module lbatch.results
local json = require "lbatch.json"
local rules = require "lbatch.impl.formats.rules"
local errors = require "lbatch.impl.transport.errors"
local cost = require "lbatch.impl.formats.cost"
local service = require "lbatch.impl.api.service"
local shape = require "lbatch.impl.formats.shape"

local core = require "lbatch.core"

local decode, normalize = json.decode, json.normalize
local json_string, scan_result, read_at, sub = core.json_string, core.result, core.line_at, string.sub
local find, answer_bytes = string.find, core.answer_bytes
local SPAN = 2 ^ 36          -- a result's place: file number * SPAN + byte offset (as core's idmap:scan)
local M = {}

local function list(name, v)
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  if type(v) == "table" then
    for _, p in ipairs(v) do
      if type(p) ~= "string" then errors.arg("results.open", name .. " must hold paths (strings)", 4) end
    end
    return v
  end
  errors.arg("results.open", name .. " must be a path or a list of paths", 4)
end

--- The text of an input request's last user message (for reports).
-- @tparam table req a request line, decoded
-- @treturn ?string
local function prompt_of(req)
  local body = type(req) == "table" and req.body
  if type(body) ~= "table" then return nil end
  if body.input ~= nil then
    return type(body.input) == "table" and table.concat(body.input, "\n") or tostring(body.input)
  end
  local text
  for _, m in ipairs(type(body.messages) == "table" and body.messages or {}) do
    if m.role == "user" then
      if type(m.content) == "string" then text = m.content
      elseif type(m.content) == "table" then
        local parts = {}
        for _, p in ipairs(m.content) do if type(p.text) == "string" then parts[#parts + 1] = p.text end end
        text = table.concat(parts, " ")
      end
    end
  end
  return text
end
M.prompt_of = prompt_of

local function tab(v) if type(v) == "table" then return v end end
local function str(v) if v ~= nil then return tostring(v) end end

--- What a failed record's code says about sending its request again:
-- code (or error type) -> class. `"retryable"`: the service did not
-- answer this time (rate limits, server errors, timeouts, a batch that
-- expired or was cancelled before the line ran, a request with no result
-- at all: `missing`); `"permanent"`: the request itself is refused
-- (validation, content inspection) and fails the same way again;
-- `"account"`: nothing runs until the account is put right (arrears, quota,
-- key). DashScope's dotted codes are looked up whole, then by the part
-- before the first dot (`Throttling.RateQuota` as `Throttling`). The
-- account codes are `lbatch.service.ACCOUNT`'s (Arrearage,
-- insufficient_quota, billing_hard_limit_reached, invalid_api_key, ...),
-- the ones a pipeline stops at. `"invalid_answer"` (code
-- `invalid_answer`): the service answered, and billed, but the answer is
-- not the JSON its request asked for; a class of its own, because it is
-- neither of the others: sent again it may well pass (a model's answers
-- vary), so it is not permanent, but sending it again costs as much again
-- and may fail the same way (a schema the model never follows), so it is
-- not retryable either, which `resubmit` takes unasked: it is taken when
-- asked (`classes`), and by a pipeline's `resubmit` up to its rounds.
-- Add or change entries to teach `classify` a code.
M.CLASSES = {
  rate_limit_exceeded = "retryable", server_error = "retryable", internal_error = "retryable",
  timeout = "retryable", request_timeout = "retryable", service_unavailable = "retryable",
  batch_expired = "retryable", batch_cancelled = "retryable", missing = "retryable",
  empty_body = "retryable", invalid_result_line = "retryable",
  Throttling = "retryable", InternalError = "retryable", ServiceUnavailable = "retryable",
  RequestTimeOut = "retryable", requests = "retryable", tokens = "retryable",
  data_inspection_failed = "permanent", DataInspectionFailed = "permanent",
  content_filter = "permanent", content_policy_violation = "permanent",
  InvalidParameter = "permanent", invalid_value = "permanent", invalid_request = "permanent",
  model_not_found = "permanent", context_length_exceeded = "permanent", InvalidModel = "permanent",
  invalid_answer = "invalid_answer",
}
for code in pairs(service.ACCOUNT) do M.CLASSES[code] = "account" end

--- The class of an HTTP status when the code says nothing: 408, 429 and
-- 5xx retryable, 401, 402 and 403 account, other 4xx permanent.
-- @tparam number status
-- @treturn ?string
function M.status_class(status)
  status = tonumber(status)
  if not status then return nil end
  if status == 408 or status == 429 or (status >= 500 and status < 600) then return "retryable" end
  if status == 401 or status == 402 or status == 403 then return "account" end
  if status >= 400 and status < 500 then return "permanent" end
end

local function class_of_code(code)
  if code == nil then return nil end
  local CLASSES = M.CLASSES
  return CLASSES[code] or CLASSES[(code:match("^([^.]+)%."))] or nil
end

-- the code a failed record is counted by: its error code, else missing,
-- http_STATUS, error (an error without a code) or empty_body
local function code_of(rec)
  if rec.error_code then return rec.error_code end
  if rec.missing then return "missing" end
  local s = tonumber(rec.status_code)
  if not s then return rec.error_message and "error" or "no_response" end
  if s < 200 or s >= 300 then return "http_" .. ("%.14g"):format(s) end   -- (%d raises on 299.5)
  if rec.error_message then return "error" end
  return "empty_body"
end

--- A record's class and the code it is counted by. Nil for an ok record.
-- The code (`error_code`, else `missing`, `http_STATUS`, `empty_body`) is
-- looked up in `results.CLASSES`, then the error's type, then the status
-- (`results.status_class`); what none of them knows is `"permanent"`
-- (never sent again unasked).
-- @tparam table rec a record
-- @treturn ?string "retryable", "permanent", "account" or "invalid_answer"
-- @treturn ?string the code
function M.classify(rec)
  if rec.ok then return nil end
  local code = code_of(rec)
  local class = class_of_code(code) or class_of_code(rec.error_type) or M.status_class(rec.status_code)
  return class or "permanent", code
end

-- a record's error fields from the line's error and its body's
local function error_fields(rec, err, berr)
  local e = tab(err) or tab(berr)
  if e then
    rec.error_code = str(e.code)
    rec.error_type = str(e.type)
    rec.error_message = str(e.message)
  end
  if not rec.error_type and tab(berr) then rec.error_type = str(berr.type) end
end

-- the output_text of a Responses answer's message items, joined
local function output_text(output)
  local parts = {}
  for _, item in ipairs(output) do
    local content = tab(item) and item.type == "message" and tab(item.content)
    for _, c in ipairs(content or {}) do
      if tab(c) and c.type == "output_text" and type(c.text) == "string" then parts[#parts + 1] = c.text end
    end
  end
  return #parts > 0 and table.concat(parts) or nil
end

--- The fields of the answers that are not chat's (openai npm 6.49.0
-- resources/responses, images, videos): a Responses answer's `content` (its
-- output_text), an ImagesResponse's `images` (its data: each {b64_json} or
-- {url}) and `content` (the first image's b64_json or url), a Video's
-- `video` (the object: id, status, ...; its bytes are fetched from
-- /videos/{id}/content). Their usage (input_tokens, output_tokens) is
-- read as chat's.
-- @tparam table rec the record
-- @tparam table body the answer's body
-- @tparam ?table data body.data
function M.shape_fields(rec, body, data)
  if body.object == "response" and tab(body.output) then
    rec.content = output_text(body.output)
  elseif body.object == "video" then
    rec.video = body
  elseif data and tab(data[1]) and (data[1].b64_json or data[1].url) then
    rec.images = data
    rec.content = data[1].b64_json or data[1].url
  end
end

--- One output or error line as a record: custom_id, ok, class (when not
-- ok), status_code, request_id, body, model, created, usage, content,
-- reasoning, embedding, images, video, error_code, error_type,
-- error_message (JSON null is nil; whole numbers are integers).
-- @tparam string line
-- @treturn table the record
local function record(line)
  local ok, r = pcall(decode, line)
  if not ok or type(r) ~= "table" then
    return { ok = false, class = M.CLASSES.invalid_result_line, error_code = "invalid_result_line",
             error_message = "result line is not JSON" }
  end
  return M.record_of(normalize(r))
end
M.record = record

--- A result line already decoded (`{custom_id, response = {status_code,
-- request_id, body}, error}`, nulls as nil) as a record: `record`'s.
-- @tparam table r
-- @treturn table the record
function M.record_of(r)
  local resp = tab(r.response)
  local body = resp and resp.body
  local err = r.error
  local berr = type(body) == "table" and body.error
  local status = resp and resp.status_code
  local rec = {
    custom_id = r.custom_id, id = r.id, status_code = status,
    request_id = resp and resp.request_id, body = body,
    ok = type(status) == "number" and status >= 200 and status < 300 and err == nil and not berr
      and type(body) == "table" and next(body) ~= nil,
  }
  if type(body) == "table" then
    rec.model, rec.created, rec.usage = body.model, body.created, tab(body.usage)
    local choices = tab(body.choices)
    local msg = choices and tab(choices[1]) and tab(choices[1].message)
    if msg then
      rec.content = msg.content
      rec.reasoning = msg.reasoning_content
    end
    local data = tab(body.data)
    if data and tab(data[1]) and data[1].embedding then rec.embedding = data[1].embedding end
    if not msg then M.shape_fields(rec, body, data) end
  end
  error_fields(rec, err, berr)
  if not rec.ok then rec.class = M.classify(rec) end
  return rec
end

-- A light record's result line, until its body is read: the record's
-- other fields come from core.result's scan, and the line is decoded
-- whole only when rec.body is read (a joined record's rec.input and
-- rec.prompt, from its request line, likewise). The line is kept beside
-- the record, not in it, so that the record holds only its fields (pairs
-- and cjson.encode see them alone): in the record's own metatable,
-- {__index = lazy, line = line} (a weak table of lines cost LuaJIT a quarter of
-- the join's time: measured in docs/benchmarks.md).
local function lazy(rec, k)
  if k == "body" then
    local line = getmetatable(rec).line
    if line == nil then return nil end
    if type(line) == "userdata" then line = answer_bytes(line) end   -- (kept so by core.window's records)
    local ok, r = pcall(decode, line)
    local resp = ok and type(r) == "table" and tab(normalize(r).response)
    local body = resp and resp.body or nil
    rawset(rec, "body", body)
    return body
  end
  if k ~= "input" and k ~= "prompt" then return nil end
  local text = rawget(rec, "line")
  if text == nil then return nil end
  local ok, req = pcall(decode, text)
  if not ok or type(req) ~= "table" then req = nil end
  rawset(rec, "input", req)
  rawset(rec, "prompt", prompt_of(req))
  return rawget(rec, k)
end
local Record = { __index = lazy }   -- a record with no line kept

--- One output or error line as a record, as `results.record` makes it,
-- light: its fields scanned in C (`core.result`), the body decoded when
-- first read; lines of a shape the scanner leaves alone are decoded whole.
-- @tparam string line
-- @tparam[opt] table rec its fields, already scanned in C (`idmap:answer`)
-- @param[opt] err the scanner's error for the line, with `rec`
-- @param[opt] berr the scanner's error for the body, with `rec`
-- @treturn table the record
local function light(line, rec, err, berr)
  if rec == nil then rec, err, berr = scan_result(line) end
  -- an answer that is not chat's nor an embedding (responses, images, videos): decoded whole
  if not rec or (rec.ok and rec.content == nil and rec.embedding == nil and not find(line, '"choices"', 1, true)) then
    rec = record(line)
  else
    if err or berr then error_fields(rec, err, berr) end
    if not rec.ok then rec.class = M.classify(rec) end
    return setmetatable(rec, { __index = lazy, line = line })
  end
  return setmetatable(rec, Record)
end
M.light = light

local Reader = {}
Reader.__index = Reader

-- the fields a record may have (results.record's, and a joined record's)
local FIELDS = {}
for name in ([[custom_id id ok class status_code request_id body model created usage content reasoning
  embedding images video error error_code error_type error_message json line input prompt missing]]):gmatch("%S+") do
  FIELDS[name] = true
end

-- each's opts.fields as a set of names; a name that is not a field raises
local function fields_of(names)
  if type(names) ~= "table" then errors.arg("results.each", "opts.fields must be a list of field names", 4) end
  for k in pairs(names) do
    if type(k) ~= "number" or k < 1 or k > #names or k % 1 ~= 0 then
      errors.arg("results.each", "opts.fields must be a list of field names (it has the key " .. tostring(k) .. ")", 4)
    end
  end
  local set = {}
  for i, name in ipairs(names) do
    if not FIELDS[name] then
      errors.arg("results.each", ("opts.fields[%d] (%s) is not a field of a record"):format(i, tostring(name)), 4)
    end
    set[name] = true
  end
  return set
end

-- the fields a lean record (each{fields = ...}) is right to lack: nil on
-- every ok record (the failure's), or only on records that come whole;
-- any other field it lacks was left out (and a field C learns to fill is
-- guarded without a word here)
local NIL_WHEN_LEAN = {}
for name in ("missing class error error_code error_type error_message json images video"):gmatch("%S+") do
  NIL_WHEN_LEAN[name] = true
end

-- a lean record's __index: lazy's, and an error for a field it left out
-- (a nil there would be a wrong answer: a cost without usage, an answer
-- without content)
local function guard_of(want)
  return function(rec, k)
    if FIELDS[k] and not NIL_WHEN_LEAN[k] and not want[k] then
      error(("lbatch.results: rec.%s was not asked for (each{fields = {..., %q}} keeps it)"):format(k, k), 2)
    end
    return lazy(rec, k)
  end
end

local function group_of(name, g)
  if type(g) ~= "table" then errors.arg("results.open", name .. " must be a table", 4) end
  return { outputs = list(name .. ".output", g.output), errs = list(name .. ".errors", g.errors),
           inputs = list(name .. ".inputs", g.inputs) }
end

--- A reader of results.
-- Joined with inputs, each result is found through an index of custom_ids
-- held in C (64 bytes a result with ids like req-0000001, no Lua string
-- per line); past `max_index` results the inputs are taken in chunks of
-- that many requests, each chunk reading the result files once, so memory stays
-- bounded whatever the files' size. `groups` joins each group's outputs
-- to its own inputs only (a pipeline's shards): memory then depends on
-- the largest group, not on the total.
-- @tparam table opts output, errors, inputs: a path or a list of paths
-- (shards); or groups = {{output=, errors=, inputs=}, ...}; placed =
-- {groups = m, at = fn(j) -> position}: the records of the first m groups
-- go at the positions at(1), at(2), ... among all (1 the first; rising; nil
-- past the last), the other groups' records fill the rest in their order
-- (a pipeline's canary, cut out of its input, back in its place); max_index
-- (results indexed at once, default 1,000,000); pause (a function called
-- between the checks of many files, `client:pause` in a task, so that a
-- host's step stays short)
-- @treturn table the reader, or nil and an `io` error when a file cannot be read
function M.open(opts)
  errors.check("results.open", "opts", opts, "table")
  errors.check("results.open", "opts.max_index", opts.max_index, "number", true)
  errors.check("results.open", "opts.pause", opts.pause, "function", true)
  local groups = {}
  if opts.groups ~= nil then
    if type(opts.groups) ~= "table" then errors.arg("results.open", "groups must be a list of tables") end
    for i, g in ipairs(opts.groups) do groups[i] = group_of("groups[" .. i .. "]", g) end
  end
  if opts.output ~= nil or opts.errors ~= nil or opts.inputs ~= nil or #groups == 0 then
    table.insert(groups, 1, group_of("opts", opts))
  end
  local placed = opts.placed
  if placed ~= nil then
    errors.check("results.open", "opts.placed", placed, "table")
    errors.check("results.open", "opts.placed.at", placed.at, "function")
    if type(placed.groups) ~= "number" or placed.groups < 0 or placed.groups > #groups then
      errors.arg("results.open", "opts.placed.groups must be a count of groups, 0 to #groups")
    end
  end
  local r = setmetatable({ groups = groups, placed = placed, outputs = {}, errs = {}, inputs = {},
                           max_index = math.max(1, math.floor(opts.max_index or M.MAX_INDEX)) }, Reader)
  local pause = opts.pause
  for _, g in ipairs(groups) do
    for _, key in ipairs({ "outputs", "errs", "inputs" }) do
      for _, path in ipairs(g[key]) do
        local fh, msg = io.open(path, "rb")
        if not fh then return nil, errors.io("cannot read", path, msg) end
        fh:close()
        r[key][#r[key] + 1] = path
        if pause then pause() end
      end
    end
  end
  return r
end
M.MAX_INDEX = 1000000

-- inside the reader, a file that cannot be read raises its io error,
-- which each() and the others return
local function open_or_fail(path)
  local fh, msg = io.open(path, "rb")
  if not fh then error(errors.io("cannot read", path, msg), 0) end
  return fh
end

-- err as an io error (a read error raised by rules.lines is a string)
local function as_error(err, path)
  if errors.is(err) then return err end
  return errors.io("cannot read", path or "a results file", err)
end

-- a line's custom_id (a string), found without decoding when it can be
local function id_of(text)
  if not text then return nil end
  local id = json_string(text, "custom_id")
  if id == false then
    local ok, r = pcall(decode, text)
    id = ok and type(r) == "table" and r.custom_id
  end
  if type(id) == "string" then return id end
end

-- scan(map, path, fileno, ...) as core's idmap:scan, with the lines it
-- could not read cheaply decoded here; raises an io error
local function scan(map, path, fileno, start, max_lines, filter, drop)
  local n, nxt, hard = map:scan(path, fileno, start, max_lines, filter, drop)
  if not n then error(errors.io("cannot read", path, nxt), 0) end
  if #hard > 0 then
    local fh = open_or_fail(path)
    for _, off in ipairs(hard) do
      local id = id_of((read_at(fh, off)))
      if id and (not filter or filter:has(id)) then
        if drop then map:take(id) else map:put(id, fileno * SPAN + off) end
      end
    end
    fh:close()
  end
  return n, nxt
end

-- every result file of a group, outputs first (a success wins)
local function result_files(g)
  local all = {}
  for _, p in ipairs(g.outputs) do all[#all + 1] = p end
  for _, p in ipairs(g.errs) do all[#all + 1] = p end
  return all
end

-- The join of one group, as an object: the group's files, where the next
-- chunk of its inputs begins, the chunk's segments and results, the input
-- being read and the result files opened so far.
local Join = {}
Join.__index = Join
-- the input lines whose answers are read together, in file order
-- (core.window): at most WINDOW lines, about WINDOW_BYTES of them; a longer
-- line than MAX_LINE is an error (the service refuses it). WINDOW is a
-- batch's most lines: a batch writes its answers in any order, and a
-- window that holds all of its requests reads each part of the output
-- once (a window of a third of them read the whole 2.9 times over)
local WINDOW, WINDOW_BYTES, MAX_LINE = service.LIMITS.max_lines, 16 * 1024 * 1024, service.LIMITS.max_line_bytes
-- the records made in one call to C (core.window's records)
local BATCH = 256

-- the next chunk of inputs as segments {file, from, to}, its results
-- indexed in self.found; false when the inputs are all read. The first
-- chunk indexes every result, up to max_index of them: all of them fit
-- (the common case, one pass over the results and no other), or the
-- index is dropped and the inputs are taken max_index at a time, each
-- chunk's results found through a filter of its ids
function Join:next_chunk()
  local inputs, files = self.inputs, self.files
  if not inputs[self.fi] then return false end
  self.chunks = self.chunks + 1
  if self.found then self.found:clear() end
  local found = core.idmap()
  self.found, self.segs, self.seg = found, {}, 0
  for k, path in ipairs(files) do
    self.handles[k] = self.handles[k] or open_or_fail(path)
    self.sizes[k] = self.handles[k]:seek("end")   -- (answers are read with pread: a shorter file is an error)
  end
  if self.chunks == 1 then
    local left = self.budget + 1
    for k, path in ipairs(files) do
      left = left - scan(found, path, k, 0, left)
      if left == 0 then break end
    end
    if left > 0 then   -- all in one chunk: what is left after the join are orphans
      for i = 1, #inputs do self.segs[i] = { i, 0, nil } end
      self.fi = #inputs + 1
      return true
    end
    found:clear()
  end
  local wanted, left = core.idmap(), self.budget
  while inputs[self.fi] and left > 0 do
    local n, nxt = scan(wanted, inputs[self.fi], self.fi, self.start, left)
    self.segs[#self.segs + 1] = { self.fi, self.start, nxt }
    left = left - n
    if nxt then self.start = nxt else self.fi, self.start = self.fi + 1, 0 end
  end
  found:reserve(wanted:count())
  for k, path in ipairs(files) do scan(found, path, k, 0, nil, wanted) end
  wanted:clear()
  self.chunked = true
  return true
end

-- the light record of answer line `line` of result file k, the answer to
-- request `id`: an io error when the line is not there any more (nil), or
-- is not that request's (the file changed since it was indexed)
function Join:checked(line, id, k)
  local why = not line and "the file is shorter than when it was indexed"
  local rec = line and light(line)
  if rec and rec.custom_id ~= id then
    if rec.custom_id == nil and json_string(line, "custom_id") == id then
      rec.custom_id = id      -- a line that is not JSON (invalid_result_line), the request's as the index read it
    else
      why = "the file changed since it was indexed"
    end
  end
  if why then error(errors.io("cannot read", self.files[k], why), 0) end
  return rec
end

-- the light record of the result at index value v, the answer to request `id`
function Join:result(v, id)
  local k = math.floor(v / SPAN)
  local h = self.handles[k]
  if not h then h = open_or_fail(self.files[k]) self.handles[k] = h end
  return self:checked(read_at(h, v - k * SPAN), id, k)
end

-- the end: the result files closed, the orphans (the results no input
-- asked for) added to the reader's (the window is the groups', kept)
function Join:finish()
  for _, h in pairs(self.handles) do h:close() end
  self.handles = {}
  self.out, self.asks, self.b, self.bn = {}, {}, 0, 0
  local orphans, found, inputs = self.reader.orphans, self.found, self.inputs
  if not self.chunked then
    for _, id in ipairs(found and found:keys() or {}) do orphans[#orphans + 1] = id end
  else                                 -- the results no chunk asked for
    for k, path in ipairs(self.files) do
      local at = 0
      while at do
        local left = core.idmap()
        at = select(2, scan(left, path, k, at, self.budget))
        for i = 1, #inputs do scan(left, inputs[i], i, 0, nil, nil, true) end
        for _, id in ipairs(left:keys()) do orphans[#orphans + 1] = id end
        left:clear()
      end
    end
  end
  if found then found:clear() end
end

-- an answer's text: chat's first choice's content, else the responses
-- API's first output_text, else a completion's text
local function answer_text(rec)
  if rec.content ~= nil then return rec.content end
  local body = tab(rec.body)
  for _, item in ipairs(body and tab(body.output) or {}) do
    if type(item) == "table" and item.type == "message" then
      for _, part in ipairs(tab(item.content) or {}) do
        if type(part) == "table" and part.type == "output_text" then return part.text end
      end
    end
  end
  local choice = body and tab(body.choices) and tab(body.choices[1])
  return choice and choice.text
end

-- an ok record whose request (line `text`) asks for JSON: its answer
-- parsed (rec.json) and checked, and an answer of the wrong shape made
-- an invalid_answer (not ok, rec.error naming why)
local function check_answer(rec, text)
  -- (format": response_format, the responses API's text.format, or either
  -- spelled with an escape, which the decode below reads as the service
  -- does; core.window's records pick the same lines)
  if not rec.ok or not text:find('format"', 1, true) then return end
  local req = rec.input
  local want = shape.wanted(tab(req) and req.body)
  if not want then return end
  local value, why, field = shape.check(answer_text(rec), want)
  rec.json = value
  if why then
    rec.ok, rec.error_code, rec.error_message = false, "invalid_answer", why
    rec.error = errors.new({ kind = "decode", code = "invalid_answer", message = why, param = field,
                             custom_id = rec.custom_id })
    rec.class = M.classify(rec)
  end
end

-- the record of input line `text` (its result, or a missing one); nil for
-- a line with no custom_id
function Join:record(text)
  -- in one call to C: the id read, taken from the index, the answer's line
  -- read and scanned (line, rec, err, berr), or nil and the id (missing)
  local line, id, err, berr = self.found:answer(text, self.handles)
  local rec, v = nil, line
  if line == false then                  -- an id the C scan leaves to Lua
    id = id_of(text)
    if not id then return nil end
    v = self.found:take(id)
    if v then rec = self:result(v, id) end
  elseif line == nil and id == nil then
    error(errors.io("cannot read", "a results file", err), 0)
  elseif line then
    rec = light(line, id, err, berr)
  end
  if not v then
    rec = { custom_id = id, ok = false, missing = true, class = M.CLASSES.missing }
    local missing = self.reader.missing_ids
    missing[#missing + 1] = id
  end
  rec.line = text
  if not v then setmetatable(rec, Record) end   -- (a result's record has its own)
  if v then check_answer(rec, text) end
  return rec
end

-- the record of input k of the window, whose answer the window read, when
-- it is not the common case that core.window's records makes whole
function Join:fetched(k)
  local text, line, rec, err, berr = self.win:take(k)
  if line == false then
    local id = json_string(text, "custom_id")
    rec = setmetatable({ custom_id = id, ok = false, missing = true, class = M.CLASSES.missing, line = text },
      Record)
    local missing = self.reader.missing_ids
    missing[#missing + 1] = id
    return rec
  end
  if type(line) == "number" then rec = self:result(line, json_string(text, "custom_id"))
  elseif rec == nil then rec = self:checked(line, json_string(text, "custom_id"), self.win:file(k))
  else rec = light(line, rec, err, berr) end
  rec.line = text
  check_answer(rec, text)
  return rec
end

-- the next batch of the window's records, from input k + 1 on: up to
-- BATCH of them made in one call to C (core.window's records: false for
-- one it leaves to Join:fetched), after the window's answers from there
-- on are read in file order (its fill). An input whose id C leaves to Lua
-- is joined alone (Join:record): its record.
function Join:batch()
  local k = self.k + 1
  if k > self.upto then
    local upto, why, file = self.win:fill(self.found, k, self.n, self.handles, self.sizes)
    if not upto then error(errors.io("cannot read", self.files[file] or "a results file", why), 0) end
    if upto < k then
      self.k, self.upto = k, k
      return self:record(self.win:text(k))
    end
    self.upto = upto
  end
  local last = math.min(self.upto, k + BATCH - 1)
  local out, asks = self.out, self.asks
  local n, m = self.win:records(k, last, self.index, out, asks, self.want)
  for a = 1, m do
    local rec = out[asks[a]]
    check_answer(rec, rec.line)
  end
  self.k, self.bk, self.b, self.bn = last, k - 1, 0, n
end

-- the next window of the segment's input lines (up to WINDOW lines, about
-- WINDOW_BYTES bytes), read into the window (core.window's read: empty
-- lines skipped); the segment's file closed at its end
function Join:fill()
  local n, pos, done = self.win:read(self.fh, self.pos, self.stop, WINDOW, WINDOW_BYTES, MAX_LINE)
  if not n then error(errors.io("cannot read", self.inputs[self.segs[self.seg][1]], pos), 0) end
  self.pos = pos
  if done then self.fh:close() self.fh = nil end
  self.n, self.k, self.upto, self.b, self.bn = n, 0, 0, 0, 0
end

-- the next record in input order, or nil at the end (and after it: the
-- end's work, the orphans counted, is done once)
function Join:step()
  if self.ended then return nil end
  while true do
    if self.b < self.bn then
      local b = self.b + 1
      self.b = b
      local rec = self.out[b] or self:fetched(self.bk + b)
      if rec then return rec end
    elseif self.k < self.n then
      local rec = self:batch()
      if rec then return rec end
    elseif self.fh then
      self:fill()
    elseif self.segs[self.seg + 1] then
      self.seg = self.seg + 1
      local s = self.segs[self.seg]
      self.fh = open_or_fail(self.inputs[s[1]])
      self.pos, self.stop = s[2], s[3]
    elseif not self:next_chunk() then
      self.ended = true
      self:finish()
      return nil
    end
  end
end

-- The join of one group: an iterator of records in input order (each
-- with .line, its request line), then nil; self.missing_ids and
-- self.orphans grow as it goes.
function Reader:_join(g, want, win)
  local j = setmetatable({ reader = self, want = want, index = want and guard_of(want) or lazy,
                           files = result_files(g), inputs = g.inputs,
                           budget = self.max_index,
                           fi = 1, start = 0, seg = 0, segs = {}, chunks = 0, found = nil, chunked = false,
                           handles = {}, fh = nil, stop = nil, pos = 0,
                           win = win, n = 0, k = 0, upto = 0, sizes = {},
                           out = {}, asks = {}, b = 0, bn = 0, bk = 0 }, Join)
  return function() return j:step() end
end

-- an iterator whose failure (a raised io error) comes out as false, err,
-- after which it ends
local function guarded(step)
  local failed = false
  return function()
    if failed then return nil end
    local ok, rec = pcall(step)
    if ok then return rec end
    failed = true
    return false, as_error(rec)
  end
end

-- a group's result lines, one record each, without inputs
local function plain(g)
  local files, k, lines, fh = result_files(g), 0, nil, nil
  return function()
    while true do
      local line = lines and lines()
      if line then
        if line ~= "" then return light(line) end
      else
        if fh then fh:close() fh = nil end
        k = k + 1
        if not files[k] then return nil end
        fh = open_or_fail(files[k])
        lines = fh:lines()
      end
    end
  end
end

--- An iterator over records: `for rec, err in r:each()`.
-- Joined with inputs, records come in input order with rec.input (the
-- request, decoded when first read), rec.prompt and rec.line (the request
-- line as it is in the file), and a request with no result gives
-- `{custom_id, ok = false, missing = true, class = "retryable"}`. A request
-- that asks for JSON gets rec.json (its answer parsed, as lua-cjson decodes
-- it: null is `json.null`), and an answer not of that shape is class
-- `invalid_answer` with rec.error (only joined: without inputs the reader
-- cannot know what was asked). A file that cannot be read
-- gives `false, err` (an `io` error) and the iteration ends. Afterwards
-- `r.orphans` lists the results no input asked for.
--
-- `opts.fields` (a list of field names) is what a loop reads of an ok
-- record: such a record then holds those fields, custom_id and ok, and may
-- lack the others, which makes a join of many answers faster (the
-- projection a database makes of a query's columns: figures in
-- docs/benchmarks.md). "body", "input" and "prompt" keep the lines they
-- are decoded from, "line" the request line. Reading a field such a
-- record left out raises an error (a silent nil could be a wrong answer);
-- missing, class and the error's fields are nil on it, as on any ok
-- record. A record that is not ok, missing, or whose request may ask for
-- JSON (its line holds format": it is checked) comes whole.
-- @tparam[opt] table opts {fields = {name, ...}}
-- @treturn function the iterator
function Reader:each(opts)
  local want
  if opts ~= nil then
    errors.check("results.each", "opts", opts, "table")
    for k in pairs(opts) do
      if k ~= "fields" then errors.arg("results.each", "opts." .. tostring(k) .. " is not an option (fields is)") end
    end
    if opts.fields ~= nil then want = fields_of(opts.fields) end
  end
  return guarded(self:_each(want))
end

-- the records of groups[from] to groups[to], group after group (joined
-- records with the fields of `want`, a set of names, at least). One
-- window serves the groups in turn, and is freed after the last: its
-- buffers (up to about 50 MB, outside the Lua heap) are made once, not
-- once a group
function Reader:_run(from, to, want)
  local g, it, win = from - 1, nil, core.window()
  return function()
    while true do
      local rec = it and it()
      if rec then return rec end
      g = g + 1
      local group = g <= to and self.groups[g]
      if not group then
        win:free()
        return nil
      end
      if #group.inputs > 0 then it = self:_join(group, want, win) else it = plain(group) end
    end
  end
end

-- the records of group after group; with `placed` = {groups = m, at}, the
-- first m groups' records go at the positions at(1), at(2), ... (1 the
-- first record) and the other groups' fill the rest, each in its order
function Reader:_each(want)
  self.missing_ids, self.orphans = {}, {}
  local p = self.placed
  if not p then return self:_run(1, #self.groups, want) end
  local sample, rest = self:_run(1, p.groups, want), self:_run(p.groups + 1, #self.groups, want)
  local j, pos, at = 1, 1, p.at(1)
  return function()
    local rec
    if at and pos >= at then
      rec = sample()
      if rec then j = j + 1 at = p.at(j) else at = nil end
    end
    rec = rec or rest() or sample()
    if rec then pos = pos + 1 end
    return rec
  end
end

--- The custom_ids of the inputs that have no result at all.
-- @treturn {string,...} the ids, or nil and an `io` error
function Reader:missing()
  for rec, err in self:each() do
    if not rec then return nil, err end
  end
  return self.missing_ids or {}
end

-- a usage table's tokens: prompt, completion (reasoning included, as the
-- services bill it), total and reasoning; chat's names or the
-- responses API's and DashScope's (input_tokens, output_tokens)
-- (and the cached input tokens, in prompt_tokens_details or input_tokens_details)
local function tokens_of(u)
  local pt = tonumber(u.prompt_tokens) or tonumber(u.input_tokens) or 0
  local ct = tonumber(u.completion_tokens) or tonumber(u.output_tokens) or 0
  local d = tab(u.completion_tokens_details) or tab(u.output_tokens_details)
  local rt = d and tonumber(d.reasoning_tokens) or 0
  local i = tab(u.prompt_tokens_details) or tab(u.input_tokens_details)
  return pt, ct, tonumber(u.total_tokens) or (pt + ct), rt, i and tonumber(i.cached_tokens) or 0
end

local TOKENS = { "prompt_tokens", "completion_tokens", "reasoning_tokens", "total_tokens", "cached_tokens", "cost" }

-- The batches' own usage and model (OpenAI fills them on batches created
-- since September 2025: openai npm 6.49.0 resources/batches.d.ts,
-- Batch.usage {input_tokens, output_tokens, total_tokens and their
-- details}, Batch.model) over the lines' sum in `s`: the service bills the
-- batch's figures, so they win; the lines' sum is kept as `s.lines_usage`
-- and `s.usage_differs` says whether they disagree. Every batch given must
-- have its usage, else the lines' sum stays (`usage_source = "lines"`): a
-- mix would count the others twice or not at all.
local function from_batches(s, batches, prices, discount)
  s.usage_source = "lines"
  if type(batches) ~= "table" or #batches == 0 then return end
  for _, b in ipairs(batches) do
    if type(b) ~= "table" or not tab(b.usage) then return end
  end
  local lines = { by_model = s.by_model }
  for _, k in ipairs(TOKENS) do lines[k], s[k] = s[k], 0 end
  s.by_model = {}
  for _, b in ipairs(batches) do
    local pt, ct, tt, rt, cached = tokens_of(b.usage)
    local model = type(b.model) == "string" and b.model or "?"
    local m = s.by_model[model] or { requests = 0, prompt_tokens = 0, completion_tokens = 0, reasoning_tokens = 0,
                                     cached_tokens = 0, cost = 0 }
    s.by_model[model] = m
    local rc = tab(b.request_counts) or tab(b.counts)
    m.requests = m.requests + (rc and tonumber(rc.completed) or 0)
    m.prompt_tokens, m.completion_tokens = m.prompt_tokens + pt, m.completion_tokens + ct
    m.reasoning_tokens, m.cached_tokens = m.reasoning_tokens + rt, m.cached_tokens + cached
    s.prompt_tokens, s.completion_tokens = s.prompt_tokens + pt, s.completion_tokens + ct
    s.total_tokens = s.total_tokens + tt
    s.reasoning_tokens, s.cached_tokens = s.reasoning_tokens + rt, s.cached_tokens + cached
    if prices[model] then
      local c = cost.of(pt, ct, prices[model], discount)
      m.cost, s.cost = m.cost + c, s.cost + c
    end
  end
  s.usage_source, s.lines_usage = "batch", lines
  s.usage_differs = lines.prompt_tokens ~= s.prompt_tokens or lines.completion_tokens ~= s.completion_tokens
end

--- Counts, tokens and a cost estimate.
-- Failed records are counted by class (`by_class`, as `results.classify`
-- says: retryable, permanent, account, invalid_answer; a missing request
-- is retryable) and by code (`by_code`: the error code, `missing`,
-- `http_STATUS`, `empty_body`, `invalid_answer`); `by_error` is `by_code`
-- without `missing` and `invalid_answer`. `total` is `ok + failed +
-- missing + invalid_answers`: an answer that is not the JSON its request
-- asked for (joined with inputs only) is counted apart, in
-- `invalid_answers`, neither ok nor failed; its tokens are counted (the
-- service billed it).
-- `reasoning_tokens` (`usage.completion_tokens_details.reasoning_tokens`,
-- or DashScope's `output_tokens_details`) are counted apart and are also
-- in `completion_tokens`: thinking is billed as output, and the cost
-- counts it so.
-- With `batches` (the batch objects these results came from, as
-- `client:retrieve` returns them) that all carry `usage` (OpenAI's, since
-- September 2025), the tokens, cost and `by_model` are the batches' usage
-- and model, which is what the service bills (`usage_source = "batch"`);
-- the lines' sum is then `lines_usage` (the same fields and `by_model`),
-- and `usage_differs` is true when the two disagree. Otherwise the lines'
-- sum (`usage_source = "lines"`).
-- @tparam[opt] table opts prices = {[model] = {input = P, output = P}}
-- (per million tokens, real-time prices), discount (0.5: batch prices),
-- batches (a list of batch objects)
-- @treturn table total, ok, failed, missing, invalid_answers, by_class, by_code, by_error,
-- prompt_tokens, completion_tokens, reasoning_tokens, total_tokens,
-- cached_tokens, cost, by_model (each requests, prompt_tokens,
-- completion_tokens, reasoning_tokens, cached_tokens, cost), usage_source,
-- lines_usage, usage_differs; or nil and an `io` error
function Reader:summary(opts)
  errors.check("results.summary", "opts", opts, "table", true)
  opts = opts or {}
  errors.check("results.summary", "opts.batches", opts.batches, "table", true)
  local prices, discount = opts.prices or {}, opts.discount or cost.DISCOUNT
  local s = { total = 0, ok = 0, failed = 0, missing = 0, invalid_answers = 0,
              by_error = {}, by_class = {}, by_code = {},
              prompt_tokens = 0, completion_tokens = 0, reasoning_tokens = 0, total_tokens = 0, cost = 0,
              cached_tokens = 0, by_model = {} }
  for rec, err in self:each() do
    if not rec then return nil, err end
    s.total = s.total + 1
    if rec.ok then s.ok = s.ok + 1
    else
      local class, code = M.classify(rec)
      s.by_class[class] = (s.by_class[class] or 0) + 1
      s.by_code[code] = (s.by_code[code] or 0) + 1
      if rec.missing then s.missing = s.missing + 1
      elseif code == "invalid_answer" then s.invalid_answers = s.invalid_answers + 1
      else
        s.failed = s.failed + 1
        s.by_error[code] = (s.by_error[code] or 0) + 1
      end
    end
    local u = rec.usage
    if (rec.ok or rec.error_code == "invalid_answer") and type(u) == "table" then
      local pt, ct, tt, rt, cached = tokens_of(u)
      s.prompt_tokens, s.completion_tokens = s.prompt_tokens + pt, s.completion_tokens + ct
      s.total_tokens, s.reasoning_tokens = s.total_tokens + tt, s.reasoning_tokens + rt
      s.cached_tokens = s.cached_tokens + cached
      local model = rec.model or "?"
      local m = s.by_model[model] or { requests = 0, prompt_tokens = 0, completion_tokens = 0,
                                       reasoning_tokens = 0, cached_tokens = 0, cost = 0 }
      s.by_model[model] = m
      m.requests, m.prompt_tokens, m.completion_tokens = m.requests + 1, m.prompt_tokens + pt, m.completion_tokens + ct
      m.reasoning_tokens, m.cached_tokens = m.reasoning_tokens + rt, m.cached_tokens + cached
      local p = prices[model]
      if p then
        local c = cost.of(pt, ct, p, discount)
        m.cost, s.cost = m.cost + c, s.cost + c
      end
    end
  end
  from_batches(s, opts.batches, prices, discount)
  return s
end

-- the classes resubmit takes: a set
local function classes_of(opts)
  if opts == nil then return { retryable = true } end
  errors.check("results.resubmit", "opts", opts, "table")
  if opts.all or opts.failed then
    return { retryable = true, permanent = true, account = true, invalid_answer = true }
  end
  if opts.classes == nil then return { retryable = true } end
  errors.check("results.resubmit", "opts.classes", opts.classes, "table")
  local set = {}
  for _, c in ipairs(opts.classes) do
    if c ~= "retryable" and c ~= "permanent" and c ~= "account" and c ~= "invalid_answer" then
      errors.arg("results.resubmit", "opts.classes holds retryable, permanent, account or invalid_answer (got "
        .. tostring(c) .. ")", 4)
    end
    set[c] = true
  end
  return set
end

--- Write the input lines of the requests worth sending again to a new
-- input file, byte for byte, in input order.
-- By default it takes the `retryable` ones (`results.classify`): those
-- with no result at all, those a batch expired or cancelled before they
-- ran, and those that failed by a rate limit (429), a server error (5xx)
-- or a timeout. It leaves the `permanent` ones (validation, content
-- inspection, other 4xx: they would fail again) and the `account` ones
-- (arrears, quota, key: nothing runs until the account is put right), and
-- the `invalid_answer` ones (answered and billed, but not the JSON asked
-- for: sent again only when asked, `classes = {"retryable",
-- "invalid_answer"}`).
-- @tparam string path the new file
-- @tparam[opt] table opts classes = {"retryable", "permanent", "account",
-- "invalid_answer"}: the classes to take; all = true: every request that
-- is not ok (`failed = true` is the same, as before)
-- @treturn integer the number of lines written, or nil and an `io` error
-- @treturn table the lines written by class, `{retryable = n, ...}`
function Reader:resubmit(path, opts)
  errors.check("results.resubmit", "path", path, "string")
  local want = classes_of(opts)
  if #self.inputs == 0 then errors.arg("results.resubmit", "open the reader with inputs") end
  local out, msg = io.open(path, "wb")
  if not out then return nil, errors.io("cannot write", path, msg) end
  local ok, res, taken = pcall(self._resubmit, self, out, want)
  local closed, cerr = out:close()
  if not ok then os.remove(path) return nil, as_error(res) end
  if not closed then os.remove(path) return nil, errors.io("cannot write", path, cerr) end
  return res, taken
end

function Reader:_resubmit(out, want)
  local n, taken = 0, {}
  for rec, err in self:each() do
    if not rec then error(err, 0) end
    local class = not rec.ok and M.classify(rec)
    if class and want[class] and rec.line then
      out:write(rec.line, "\n")
      n = n + 1
      taken[class] = (taken[class] or 0) + 1
    end
  end
  return n, taken
end


-- ------------------------------------------------------------ output files

local REPLACEMENT = "\239\191\189"   -- U+FFFD

--- A string as valid UTF-8: each byte that is not part of a valid sequence
-- becomes U+FFFD; with `nul`, each NUL byte too (for CSV: JSON escapes it).
-- @tparam string s
-- @tparam[opt] boolean nul
-- @treturn string the string, and true when it was changed
function M.repair(s, nul)
  local bad, changed = rules.utf8_bad(s), false
  if bad then
    local out, rest = {}, s
    while bad do
      out[#out + 1] = sub(rest, 1, bad - 1)
      out[#out + 1] = REPLACEMENT
      rest = sub(rest, bad + 1)
      bad = rules.utf8_bad(rest)
    end
    out[#out + 1] = rest
    s, changed = table.concat(out), true
  end
  if nul and s:find("\0", 1, true) then s, changed = s:gsub("%z", REPLACEMENT), true end
  return s, changed
end

--- A value (a string, or a table of them) as `repair` makes it: the same
-- value when nothing needs repair, else a copy (a table copied only along
-- the path to what changed).
-- @param v
-- @tparam[opt] boolean nul
-- @return the value, and true when anything in it was changed
function M.sanitize(v, nul)
  if type(v) == "string" then return M.repair(v, nul) end
  if type(v) ~= "table" then return v, false end
  local out
  for k, x in pairs(v) do
    local k2, c1 = M.sanitize(k, nul)
    local x2, c2 = M.sanitize(x, nul)
    if c1 or c2 then
      if not out then
        out = {}
        for a, b in pairs(v) do out[a] = b end
      end
      if c1 then out[k] = nil end
      out[k2] = x2
    end
  end
  if not out then return v, false end
  return setmetatable(out, getmetatable(v)), true
end

--- An output file written whole or not at all: `fill(fh)` writes to a temp
-- file beside `path` (a value, or nil and an error); the file is then
-- closed, synced and renamed over `path`, and the directory synced
-- (`journal.replace`, under a temp name of its own). On any failure the
-- temp file is removed and `path` left as it was.
-- @tparam string path
-- @tparam function fill
-- @return what `fill` returned, or nil and an `io` error
function M.write_whole(path, fill)
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir == "" then dir = "/" end
  -- (a table's address differs between processes where LuaJIT's random numbers do not)
  local tmp = ("%s/.%s.%s%d.tmp"):format(dir, path:match("[^/]*$"), tostring({}):match("(%x+)$") or "",
    math.random(1e9))
  return require("lbatch.impl.orchestration.journal").replace(path, fill, tmp)
end

return M
