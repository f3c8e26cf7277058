-- Results: output and error files read together, one record per request,
-- optionally joined with the input files (then in input order, with the
-- requests that have no result at all). Streaming: one decoded line at a
-- time, never the whole file.
--
--   local r = results.open{ output = "out.jsonl", errors = "err.jsonl", inputs = "in.jsonl" }
--   for rec in r:each() do print(rec.custom_id, rec.ok, rec.content or rec.error_message) end
local json = require "lbatch.json"
local rules = require "lbatch.rules"
local errors = require "lbatch.errors"

local decode, null = json.decode, json.null
local M = {}

local function list(v)
  if v == nil then return {} end
  if type(v) == "string" then return { v } end
  if type(v) == "table" then return v end
  error("results: a path or a list of paths is expected", 3)
end

local function nn(v) if v ~= null then return v end end

-- the text of an input request's last user message (for reports)
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

-- One output or error line as a record.
local function record(line)
  local ok, r = pcall(decode, line)
  if not ok or type(r) ~= "table" then
    return { ok = false, error_code = "invalid_result_line", error_message = "result line is not JSON" }
  end
  local resp = nn(r.response)
  local body = resp and nn(resp.body)
  local err = nn(r.error)
  local berr = type(body) == "table" and nn(body.error)
  local status = resp and nn(resp.status_code)
  local rec = {
    custom_id = r.custom_id, id = nn(r.id), status_code = status,
    request_id = resp and nn(resp.request_id), body = body,
    ok = status == 200 and err == nil and berr == nil,
  }
  if type(body) == "table" then
    rec.model, rec.created, rec.usage = nn(body.model), nn(body.created), nn(body.usage)
    local choices = nn(body.choices)
    local msg = choices and choices[1] and nn(choices[1].message)
    if msg then
      rec.content = nn(msg.content)
      rec.reasoning = nn(msg.reasoning_content)
    end
    local data = nn(body.data)
    if type(data) == "table" and data[1] and data[1].embedding then rec.embedding = data[1].embedding end
  end
  local e = err or berr
  if type(e) == "table" then
    rec.error_code = nn(e.code) and tostring(e.code) or nil
    rec.error_message = nn(e.message)
  end
  return rec
end
M.record = record

local Reader = {}
Reader.__index = Reader

-- open{output=, errors=, inputs=}: paths or lists of paths (shards)
function M.open(opts)
  if type(opts) ~= "table" then error("results.open: a table is expected", 2) end
  return setmetatable({
    outputs = list(opts.output), errs = list(opts.errors), inputs = list(opts.inputs),
  }, Reader)
end

local function open_or_fail(path)
  local fh, msg = io.open(path, "rb")
  if not fh then error(errors.new({ kind = "invalid", message = "cannot read " .. tostring(msg) }), 0) end
  return fh
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
    for n, text, bytes in rules.lines(fh, math.huge) do
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

-- each(): an iterator over records. Joined with inputs, records come in
-- input order with rec.input (the request) and rec.prompt, and a request
-- with no result gives {custom_id, ok = false, missing = true}.
function Reader:each()
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
  local results = self:_lookup()
  self.missing_ids = {}
  local k, it, fh = 0, nil, nil
  return function()
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

-- missing(): custom_ids of the inputs that have no result at all
function Reader:missing()
  for _ in self:each() do end
  return self.missing_ids or {}
end

-- summary{prices = {[model] = {input = P, output = P}} (per million tokens,
-- real-time prices), discount = 0.5}: counts, tokens and a cost estimate.
function Reader:summary(opts)
  opts = opts or {}
  local prices, discount = opts.prices or {}, opts.discount or 0.5
  local s = { total = 0, ok = 0, failed = 0, missing = 0, by_error = {},
              prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0, by_model = {} }
  for rec in self:each() do
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
      s.prompt_tokens, s.completion_tokens, s.total_tokens = s.prompt_tokens + pt, s.completion_tokens + ct, s.total_tokens + tt
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

-- resubmit(path[, {failed = true}]): write the input lines of the requests
-- that did not run (no result, or expired / cancelled) to a new input file,
-- byte for byte; with failed = true also those that ran and failed.
-- Returns the number of lines written.
function Reader:resubmit(path, opts)
  if #self.inputs == 0 then error("results.resubmit: open the reader with inputs", 2) end
  local results = self:_lookup()
  local out, msg = io.open(path, "wb")
  if not out then return nil, errors.new({ kind = "invalid", message = "cannot write " .. tostring(msg) }) end
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
  out:close()
  return n
end

return M
