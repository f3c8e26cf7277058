-- CSV (RFC 4180: commas, quotes doubled, newlines inside quotes, CRLF or
-- LF, UTF-8, an optional byte-order mark) and the two conversions:
-- csv -> jsonl requests, and results -> csv.
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local errors = require "lbatch.errors"

local M = {}
local BOM = "\239\187\191"
local find, sub, gsub = string.find, string.sub, string.gsub

-- rows(path): an iterator over rows, each a list of strings
function M.rows(path)
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.new({ kind = "invalid", message = "cannot read " .. tostring(msg) }) end
  local first = true
  local lines = fh:lines()
  local function nextline()
    local l = lines()
    if l == nil then return nil end
    if first then
      first = false
      if sub(l, 1, 3) == BOM then l = sub(l, 4) end
    end
    return l
  end
  return function()
    local line = nextline()
    if line == nil then fh:close() return nil end
    -- a record's \r\n ends it only outside quotes: inside, \r is data
    local row, pos = {}, 1
    while true do
      if sub(line, pos, pos) == '"' then
        -- quoted: up to a quote not followed by another, across lines
        local parts, i = {}, pos + 1
        while true do
          local q = find(line, '"', i, true)
          if not q then
            parts[#parts + 1] = sub(line, i)
            local more = nextline()
            if more == nil then error(errors.new({ kind = "invalid", message = "csv: unterminated quoted field" }), 0) end
            parts[#parts + 1] = "\n"
            line, i = more, 1
          elseif sub(line, q + 1, q + 1) == '"' then
            parts[#parts + 1] = sub(line, i, q)
            i = q + 2
          else
            parts[#parts + 1] = sub(line, i, q - 1)
            pos = q + 1
            break
          end
        end
        row[#row + 1] = table.concat(parts)
        if sub(line, pos, pos) == "\r" and pos == #line then pos = pos + 1 end
        if pos > #line then break end
        pos = pos + 1   -- the comma
      else
        local c = find(line, ",", pos, true)
        if c then
          row[#row + 1] = sub(line, pos, c - 1)
          pos = c + 1
        else
          local last = sub(line, pos)
          if sub(last, -1) == "\r" then last = sub(last, 1, -2) end
          row[#row + 1] = last
          break
        end
      end
    end
    return row
  end
end

local function quote(v)
  if v == nil then return "" end
  v = tostring(v)
  if find(v, '[,"\r\n]') then return '"' .. gsub(v, '"', '""') .. '"' end
  return v
end
M.quote = quote

local Writer = {}
Writer.__index = Writer

-- writer(path, {bom = true}): w:row{...}; w:close()
function M.writer(path, opts)
  local fh, msg = io.open(path, "wb")
  if not fh then return nil, errors.new({ kind = "invalid", message = "cannot write " .. tostring(msg) }) end
  fh:setvbuf("full", 1024 * 1024)
  if opts and opts.bom then fh:write(BOM) end
  return setmetatable({ fh = fh, n = 0 }, Writer)
end

function Writer:row(fields, count)
  local out = {}
  for i = 1, count or #fields do out[i] = quote(fields[i]) end
  self.fh:write(table.concat(out, ","), "\r\n")
  self.n = self.n + 1
end

function Writer:close() self.fh:close() return self.n end

-- to_jsonl(csv_path, {path = jsonl path, model =, system =, endpoint =,
-- header = true, ...request params}): first column custom_id, second the
-- user's content. Returns the writer's manifest, or nil and the first error.
local SKIP = { path = true, header = true, system = true, endpoint = true, max_lines = true,
               max_bytes = true, unique = true, model = true }
function M.to_jsonl(csv_path, opts)
  if type(opts) ~= "table" or type(opts.path) ~= "string" then error("csv.to_jsonl: opts.path is required", 2) end
  if type(opts.model) ~= "string" then error("csv.to_jsonl: opts.model is required", 2) end
  local rows, err = M.rows(csv_path)
  if not rows then return nil, err end
  local w = jsonl.writer({ path = opts.path, endpoint = opts.endpoint, model = opts.model,
                           max_lines = opts.max_lines, max_bytes = opts.max_bytes, unique = opts.unique })
  local embeddings = opts.endpoint == "/v1/embeddings"
  local skip_header = opts.header ~= false
  local ok, res = pcall(function()
    for row in rows do
      if skip_header then skip_header = false
      elseif #row > 1 or (row[1] or "") ~= "" then
        local req = {}
        for k, v in pairs(opts) do if not SKIP[k] then req[k] = v end end
        local done, e
        if embeddings then
          req.input = row[2] or ""
          done, e = w:embedding(row[1] or "", req)
        else
          req.prompt, req.system = row[2] or "", opts.system
          done, e = w:chat(row[1] or "", req)
        end
        if not done then error(e, 0) end
      end
    end
  end)
  local manifest = w:close()
  if not ok then return nil, res end
  return manifest
end

M.COLUMNS = { "custom_id", "model", "request_id", "status_code", "error_code", "error_message",
              "created", "content", "usage" }

local function cell(rec, name)
  if name == "usage" then
    local u = rec.usage
    if type(u) ~= "table" then return "" end
    return ("%d/%d/%d"):format(u.prompt_tokens or 0, u.completion_tokens or 0, u.total_tokens or 0)
  elseif name == "content" and rec.content == nil and rec.embedding then
    return #rec.embedding .. " dimensions"
  elseif name == "input" then
    return rec.prompt
  end
  local v = rec[name]
  if type(v) == "number" and v == math.floor(v) then return ("%d"):format(v) end
  return v
end

-- from_results(reader or open{} options, csv_path, {bom =, columns =, header =}):
-- one row per record. Columns default to M.COLUMNS ("usage" is
-- prompt/completion/total tokens); "input" is the request's user text when
-- the reader is joined with inputs. Returns the number of records.
function M.from_results(reader, csv_path, opts)
  opts = opts or {}
  if getmetatable(reader) == nil then reader = results.open(reader) end
  local columns = opts.columns or M.COLUMNS
  local w, err = M.writer(csv_path, { bom = opts.bom })
  if not w then return nil, err end
  w:row(opts.header or columns)
  local n = 0
  for rec in reader:each() do
    local row = {}
    for i, name in ipairs(columns) do row[i] = cell(rec, name) end
    w:row(row, #columns)
    n = n + 1
  end
  w:close()
  return n
end

return M
