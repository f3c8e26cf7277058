--- Results: output and error files read together, one record per
-- request, optionally joined with the input files (then in input order,
-- with the requests that have no result at all). Streaming: one decoded
-- line at a time, never the whole file.
--
--    local r = assert(results.open{ output = "out.jsonl", errors = "err.jsonl", inputs = "in.jsonl" })
--    for rec, err in r:each() do
--      if not rec then error(err) end
--      print(rec.custom_id, rec.ok, rec.content or rec.error_message)
--    end
-- @module lbatch.results
local json = require "lbatch.json"
local rules = require "lbatch.rules"
local errors = require "lbatch.errors"

local decode, normalize = json.decode, json.normalize
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

--- One output or error line as a record: custom_id, ok, status_code,
-- request_id, body, model, created, usage, content, reasoning, embedding,
-- error_code, error_message (JSON null is nil; whole numbers are integers).
-- @tparam string line
-- @treturn table the record
local function record(line)
  local ok, r = pcall(decode, line)
  if not ok or type(r) ~= "table" then
    return { ok = false, error_code = "invalid_result_line", error_message = "result line is not JSON" }
  end
  normalize(r)
  local resp = tab(r.response)
  local body = resp and resp.body
  local err = r.error
  local berr = type(body) == "table" and body.error
  local status = resp and resp.status_code
  local rec = {
    custom_id = r.custom_id, id = r.id, status_code = status,
    request_id = resp and resp.request_id, body = body,
    ok = status == 200 and err == nil and not berr,
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
  end
  local e = tab(err) or tab(berr)
  if e then
    rec.error_code = str(e.code)
    rec.error_message = str(e.message)
  end
  return rec
end
M.record = record

local Reader = {}
Reader.__index = Reader

--- A reader of results.
-- @tparam table opts output, errors, inputs: a path or a list of paths (shards)
-- @treturn table the reader, or nil and an `io` error when a file cannot be read
function M.open(opts)
  errors.check("results.open", "opts", opts, "table")
  local r = setmetatable({
    outputs = list("output", opts.output), errs = list("errors", opts.errors), inputs = list("inputs", opts.inputs),
  }, Reader)
  for _, group in ipairs({ r.outputs, r.errs, r.inputs }) do
    for _, path in ipairs(group) do
      local fh, msg = io.open(path, "rb")
      if not fh then return nil, errors.io("cannot read", path, msg) end
      fh:close()
    end
  end
  return r
end

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

-- every result file, in order
function Reader:_files()
  local all = {}
  for _, p in ipairs(self.outputs) do all[#all + 1] = p end
  for _, p in ipairs(self.errs) do all[#all + 1] = p end
  return all
end

-- custom_id -> file number and byte offset of its result line
function Reader:_index()
  local files, where, offset = self:_files(), {}, {}
  for k, path in ipairs(files) do
    local fh = open_or_fail(path)
    local off = 0
    for _, text, bytes in rules.lines(fh, math.huge) do
      local id = text:match('"custom_id":%s*"([^"\\]*)"')
      if not id then
        local ok, r = pcall(decode, text)
        id = ok and type(r) == "table" and r.custom_id or nil
      end
      if id and not where[id] then where[id], offset[id] = k, off end
      off = off + bytes
    end
    fh:close()
  end
  return files, where, offset
end

-- take(id): the record of id's result, read once (nil when it has none);
-- rest(): the ids never taken; close(): the result files
function Reader:_lookup()
  local files, where, offset = self:_index()
  local handles = {}
  return {
    take = function(id)
      local f = where[id]
      if not f then return nil end
      where[id] = nil
      local h = handles[f]
      if not h then h = open_or_fail(files[f]) handles[f] = h end
      h:seek("set", offset[id])
      return record(h:read("*l"))
    end,
    rest = function()
      local t = {}
      for id in pairs(where) do t[#t + 1] = id end
      return t
    end,
    close = function() for _, h in pairs(handles) do h:close() end end,
  }
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

--- An iterator over records: `for rec, err in r:each()`.
-- Joined with inputs, records come in input order with rec.input (the
-- request) and rec.prompt, and a request with no result gives
-- `{custom_id, ok = false, missing = true}`. A file that cannot be read
-- gives `false, err` (an `io` error) and the iteration ends.
-- @treturn function the iterator
function Reader:each()
  return guarded(self:_each())
end

function Reader:_each()
  if #self.inputs == 0 then
    local files, k, lines, fh = self:_files(), 0, nil, nil
    return function()
      while true do
        local line = lines and lines()
        if line then
          if line ~= "" then return record(line) end
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
  local results
  self.missing_ids = {}
  local k, it, fh = 0, nil, nil
  return function()
    results = results or self:_lookup()
    while true do
      local n, text = nil, nil
      if it then n, text = it() end
      if n then
        local okj, req = pcall(decode, text or "")
        local id = okj and type(req) == "table" and req.custom_id
        if id then
          local rec = results.take(id)
          if not rec then
            rec = { custom_id = id, ok = false, missing = true }
            self.missing_ids[#self.missing_ids + 1] = id
          end
          rec.input, rec.prompt = req, prompt_of(req)
          return rec
        end
      else
        if fh then fh:close() fh = nil end
        k = k + 1
        if not self.inputs[k] then
          results.close()
          self.orphans = results.rest()
          return nil
        end
        fh = open_or_fail(self.inputs[k])
        it = rules.lines(fh)
      end
    end
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

--- Counts, tokens and a cost estimate.
-- @tparam[opt] table opts prices = {[model] = {input = P, output = P}}
-- (per million tokens, real-time prices), discount (0.5: batch prices)
-- @treturn table total, ok, failed, missing, by_error, prompt_tokens,
-- completion_tokens, total_tokens, cost, by_model; or nil and an `io` error
function Reader:summary(opts)
  errors.check("results.summary", "opts", opts, "table", true)
  opts = opts or {}
  local prices, discount = opts.prices or {}, opts.discount or 0.5
  local s = { total = 0, ok = 0, failed = 0, missing = 0, by_error = {},
              prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0, by_model = {} }
  for rec, err in self:each() do
    if not rec then return nil, err end
    s.total = s.total + 1
    if rec.missing then s.missing = s.missing + 1
    elseif rec.ok then s.ok = s.ok + 1
    else
      s.failed = s.failed + 1
      local code = rec.error_code or ("http_" .. tostring(rec.status_code))
      s.by_error[code] = (s.by_error[code] or 0) + 1
    end
    local u = rec.usage
    if rec.ok and type(u) == "table" then
      local pt, ct = tonumber(u.prompt_tokens) or 0, tonumber(u.completion_tokens) or 0
      local tt = tonumber(u.total_tokens) or (pt + ct)
      s.prompt_tokens, s.completion_tokens = s.prompt_tokens + pt, s.completion_tokens + ct
      s.total_tokens = s.total_tokens + tt
      local model = rec.model or "?"
      local m = s.by_model[model] or { requests = 0, prompt_tokens = 0, completion_tokens = 0, cost = 0 }
      s.by_model[model] = m
      m.requests, m.prompt_tokens, m.completion_tokens = m.requests + 1, m.prompt_tokens + pt, m.completion_tokens + ct
      local p = prices[model]
      if p then
        local c = (pt * (p.input or 0) + ct * (p.output or 0)) / 1e6 * discount
        m.cost, s.cost = m.cost + c, s.cost + c
      end
    end
  end
  return s
end

local NOT_RUN = { batch_expired = true, batch_cancelled = true }

--- Write the input lines of the requests that did not run (no result, or
-- expired / cancelled) to a new input file, byte for byte.
-- @tparam string path the new file
-- @tparam[opt] table opts failed = true: also those that ran and failed
-- @treturn integer the number of lines written, or nil and an `io` error
function Reader:resubmit(path, opts)
  errors.check("results.resubmit", "path", path, "string")
  if #self.inputs == 0 then errors.arg("results.resubmit", "open the reader with inputs") end
  local out, msg = io.open(path, "wb")
  if not out then return nil, errors.io("cannot write", path, msg) end
  local ok, res = pcall(self._resubmit, self, out, opts)
  local closed, cerr = out:close()
  if not ok then os.remove(path) return nil, as_error(res) end
  if not closed then os.remove(path) return nil, errors.io("cannot write", path, cerr) end
  return res
end

function Reader:_resubmit(out, opts)
  local results = self:_lookup()
  local n = 0
  for _, input in ipairs(self.inputs) do
    local fh = open_or_fail(input)
    for _, text in rules.lines(fh) do
      local okj, req = pcall(decode, text or "")
      local id = okj and type(req) == "table" and req.custom_id
      if id then
        local rec = results.take(id)
        local again = not rec or (not rec.ok and (NOT_RUN[rec.error_code] or (opts and opts.failed))) or false
        if again then out:write(text, "\n") n = n + 1 end
      end
    end
    fh:close()
  end
  results.close()
  return n
end

return M
