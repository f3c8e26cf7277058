--- CSV (RFC 4180: commas, quotes doubled, newlines inside quotes, CRLF or
-- LF, UTF-8, an optional byte-order mark) and the two conversions:
-- csv -> jsonl requests, and results -> csv.
-- @module lbatch.csv
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local errors = require "lbatch.impl.transport.errors"

local M = {}
local BOM = "\239\187\191"
local find, sub, gsub = string.find, string.sub, string.gsub

-- csv.rows(path) and its file handle (closed at the end of the rows)
local function open_rows(path)
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  local first, lineno, failed, start = true, 0, false, 0
  local function nextline()
    local l, err = fh:read("*l")
    if l == nil and err then error(errors.io("cannot read", path, err), 0) end
    lineno = lineno + 1
    if l == nil then return nil end
    if first then
      first = false
      if sub(l, 1, 3) == BOM then l = sub(l, 4) end
    end
    return l
  end
  local function row_of()
    local line = nextline()
    if line == nil then fh:close() return nil end
    start = lineno
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
            if more == nil then
              error(errors.new({ kind = "invalid", code = "csv_unterminated_quote", param = "path",
                message = ("%s:%d: a quoted field is never closed"):format(path, start) }), 0)
            end
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
  return function()
    if failed then return nil end
    local ok, row = pcall(row_of)
    if ok then return row end
    failed = true
    if io.type(fh) == "file" then fh:close() end
    return false, row
  end, fh, function() return start end
end

--- An iterator over rows, each a list of strings:
-- `for row, err in csv.rows(path)`. A row that cannot be read (an
-- unterminated quote, a read error) gives `false, err` and ends it.
-- @tparam string path
-- @treturn function the iterator, or nil and an `io` error
function M.rows(path)
  errors.check("csv.rows", "path", path, "string")
  local it, err = open_rows(path)
  if not it then return nil, err end
  return it
end

local function quote(v)
  if v == nil then return "" end
  v = tostring(v)
  -- a field that starts with a byte-order mark is quoted too: unquoted
  -- first in a file, the reader would take it for the file's mark
  if find(v, '[,"\r\n]') or sub(v, 1, 3) == BOM then return '"' .. gsub(v, '"', '""') .. '"' end
  return v
end
M.quote = quote

local Writer = {}
Writer.__index = Writer

--- A CSV writer: `w:row{...}`, `w:close()`.
-- @tparam string path
-- @tparam[opt] table opts bom = true: a byte-order mark first
-- @treturn table the writer, or nil and an `io` error
function M.writer(path, opts)
  errors.check("csv.writer", "path", path, "string")
  local fh, msg = io.open(path, "wb")
  if not fh then return nil, errors.io("cannot write", path, msg) end
  fh:setvbuf("full", 1024 * 1024)
  if opts and opts.bom then fh:write(BOM) end
  return setmetatable({ fh = fh, n = 0, path = path }, Writer)
end

--- Write a row.
-- @tparam table fields the values (nil as empty)
-- @tparam[opt] integer count how many (default #fields)
-- @return true, or nil and an `io` error
function Writer:row(fields, count)
  local out = {}
  for i = 1, count or #fields do out[i] = quote(fields[i]) end
  local ok, msg = self.fh:write(table.concat(out, ","), "\r\n")
  if not ok then return nil, errors.io("cannot write", self.path, msg) end
  self.n = self.n + 1
  return true
end

--- Close the file.
-- @treturn integer the rows written, or nil and an `io` error
function Writer:close()
  local ok, msg = self.fh:close()
  if not ok then return nil, errors.io("cannot write", self.path, msg) end
  return self.n
end

local SKIP = { path = true, header = true, system = true, endpoint = true, max_lines = true,
               max_bytes = true, unique = true, model = true, limits = true }

--- The names a header's first cell may have (the custom_id column), after
-- trimming, lowering and `-` or spaces as `_`.
M.ID_NAMES = { custom_id = true, id = true, customid = true, request_id = true, question_id = true,
               qid = true }
--- The names a header's second cell may have (the content column).
M.TEXT_NAMES = { content = true, prompt = true, question = true, text = true, input = true, query = true,
                 message = true, user = true, instruction = true }

local function name_of(cell)
  if type(cell) ~= "string" then return nil end
  return (cell:gsub("^%s+", ""):gsub("%s+$", ""):lower():gsub("[%s%-]+", "_"))
end

--- Whether a row is a header: its first or second cell is a known name
-- of the id column (`csv.ID_NAMES`: custom_id, id, ...) or of the content
-- column (`csv.TEXT_NAMES`: content, prompt, question, text, ...), in any
-- order and any case (`question,id` is a header). A row of data is taken
-- as it is.
-- @tparam table row a row's cells
-- @treturn boolean
function M.is_header(row)
  for i = 1, 2 do
    local n = name_of(row[i])
    if M.ID_NAMES[n] or M.TEXT_NAMES[n] then return true end
  end
  return false
end

--- The columns of the id and of the content: where a header names them
-- (in any order), else the first and the second.
-- @tparam ?table header the header's cells (nil: no header)
-- @treturn integer the id's column
-- @treturn integer the content's column
function M.columns(header)
  local id, text
  for i, c in ipairs(header or {}) do
    local n = name_of(c)
    if not id and M.ID_NAMES[n] then id = i
    elseif not text and M.TEXT_NAMES[n] then text = i end
  end
  if not id then id = text == 1 and 2 or 1 end
  if not text then text = id == 1 and 2 or 1 end
  return id, text
end

local function blank(row) return #row <= 1 and (row[1] or "") == "" end

-- whether to skip first, the first row that is not blank: header = true
-- skips it, false keeps it, nil skips it when it is a header
local function skips(first, header)
  if header == nil then return M.is_header(first) end
  return header == true
end

--- The first row of a CSV when it would be skipped as a header (as
-- `to_jsonl` decides): its cells, or false when it is data.
-- @tparam string path
-- @tparam[opt] boolean header true: it is a header; false: it is not;
-- nil: recognised by its cells (`csv.is_header`)
-- @return the cells, or false; or nil and an error
function M.header_of(path, header)
  errors.check("csv.header_of", "path", path, "string")
  errors.check("csv.header_of", "header", header, "boolean", true)
  local rows, fh = open_rows(path)
  if not rows then return nil, fh end
  for row, rerr in rows do
    if not row then return nil, rerr end
    if not blank(row) then
      if io.type(fh) == "file" then fh:close() end
      return skips(row, header) and row or false
    end
  end
  return false
end

-- a row with no content (an empty cell, or no such column): an error
-- naming the file, its line and the row; nil when it has content
local function no_content(path, line, n, row, header, id, text)
  local v = row[text]
  if v ~= nil and find(v, "%S") then return nil end
  local what = header and header[text] and ("the %q column (%d)"):format(header[text], text) or ("column " .. text)
  local message = v == nil
    and ("%s:%d: row %d has no content column: %d cell(s), the content would be %s (a CSV of questions is "
      .. "id,content)"):format(path, line, n, #row, what)
    or ("%s:%d: row %d (%s) has no content: %s is empty"):format(path, line, n, tostring(row[id]), what)
  return errors.new({ kind = "invalid", code = "csv_no_content", param = "path", line = line, row = n,
                      message = message })
end

-- the requests of a CSV into writer w; nil, err on the first failure;
-- true and the header's cells when the first row was skipped
local function add_rows(w, rows, line_of, path, opts)
  local embeddings = opts.endpoint == "/v1/embeddings"
  local first, header, n = true, nil, 0
  local id, text = M.columns(nil)
  for row, err in rows do
    if not row then return nil, err end
    n = n + 1
    if not blank(row) then
      if first and skips(row, opts.header) then
        header = row
        id, text = M.columns(header)
      else
        local e = no_content(path, line_of(), n, row, header, id, text)
        if e then return nil, e end
        local req = {}
        for k, v in pairs(opts) do if not SKIP[k] then req[k] = v end end
        local done
        if embeddings then
          req.input = row[text]
          done, e = w:embedding(row[id] or "", req)
        else
          req.prompt, req.system = row[text], opts.system
          done, e = w:chat(row[id] or "", req)
        end
        if not done then return nil, e end
      end
      first = false
    end
  end
  return true, header
end

--- A CSV of questions as request files: the first column is the
-- custom_id, the second the user's content, unless a header names them in
-- another order (`csv.columns`). Every row is a request but a first row
-- that is a header: one whose cells name the columns (`csv.is_header`:
-- `custom_id` or `id`, `content`, `prompt`, `question`, `text`, ..., in
-- either of the first two cells), or any first row with `header = true`;
-- `header = false` takes the first row as a request whatever it holds.
-- A row without content (an empty or blank cell, or no content column at
-- all) is an error naming its line and row (code `csv_no_content`): no
-- empty request is written.
-- The manifest says what was skipped: `skipped_header` (true or false) and
-- `header` (the skipped row's cells).
-- @tparam string csv_path
-- @tparam table opts path (the JSONL, a template as in `jsonl.writer`),
-- model, system, endpoint, header (nil: recognised; true: the first row
-- is a header; false: the first row is data too),
-- limits, max_lines, max_bytes, unique (as in `jsonl.writer`), and any
-- request parameter (temperature, ...)
-- @treturn table the writer's manifest with skipped_header and header,
-- or nil and the first error
function M.to_jsonl(csv_path, opts)
  errors.check("csv.to_jsonl", "opts", opts, "table")
  errors.check("csv.to_jsonl", "opts.path", opts.path, "string")
  errors.check("csv.to_jsonl", "opts.model", opts.model, "string")
  errors.check("csv.to_jsonl", "opts.header", opts.header, "boolean", true)
  errors.check("csv.to_jsonl", "csv_path", csv_path, "string")
  local rows, err, line_of = open_rows(csv_path)
  if not rows then return nil, err end
  local w = jsonl.writer({ path = opts.path, endpoint = opts.endpoint, model = opts.model, limits = opts.limits,
                           max_lines = opts.max_lines, max_bytes = opts.max_bytes, unique = opts.unique })
  local ok, res = add_rows(w, rows, line_of, csv_path, opts)
  local manifest, cerr = w:close()
  if not ok then          -- no part of a CSV that failed is left to upload
    for _, f in ipairs(manifest and manifest.files or {}) do os.remove(f.path) end
    return nil, res
  end
  if not manifest then return nil, cerr end
  manifest.skipped_header, manifest.header = res ~= nil, res
  return manifest
end

-- what csv.validate reports of a CSV that made no requests: its problem
local function problem_of(path, err)
  local message, at = tostring(err.message), ("%s:%s: "):format(path, tostring(err.line))
  if message:sub(1, #at) == at then message = message:sub(#at + 1) end
  return { ok = false, problems = { { code = err.code, line = err.line, message = message, param = err.param } },
           warnings = {}, lines = 0, bytes = 0 }
end

-- the reports of the request files, as one (a problem's line becomes the
-- request's number in the whole CSV, named in its message)
local function merge(rep, r, offset)
  for _, k in ipairs({ "problems", "warnings" }) do
    for _, p in ipairs(r[k]) do
      if p.line then p.message, p.line = ("request %d: %s"):format(offset + p.line, tostring(p.message)), nil end
      rep[k][#rep[k] + 1] = p
    end
  end
  rep.lines, rep.bytes = rep.lines + r.lines, rep.bytes + r.bytes
  rep.model, rep.endpoint = rep.model or r.model, rep.endpoint or r.endpoint
end

--- Every problem of a CSV of questions, as `jsonl.validate` reports a
-- request file: the CSV is turned into requests in temporary files (as
-- `to_jsonl` does: a row without content is a problem naming its row,
-- code `csv_no_content`) and each is validated, then removed.
-- @tparam string csv_path
-- @tparam table opts model (required), endpoint, limits, region, header,
-- system
-- @treturn table the report of `jsonl.validate` (`lines`: the requests),
-- with skipped_header and header; or nil and an `io` error
function M.validate(csv_path, opts)
  errors.check("csv.validate", "csv_path", csv_path, "string")
  errors.check("csv.validate", "opts", opts, "table")
  errors.check("csv.validate", "opts.model", opts.model, "string")
  local tmp = os.tmpname()
  local m, err = M.to_jsonl(csv_path, { path = tmp .. ".jsonl", model = opts.model, endpoint = opts.endpoint,
    limits = opts.limits, header = opts.header, system = opts.system, unique = "all" })
  os.remove(tmp)
  if not m then
    if err.kind == "io" then return nil, err end
    return problem_of(csv_path, err)
  end
  local rep, failure = { problems = {}, warnings = {}, lines = 0, bytes = 0, skipped_header = m.skipped_header,
                         header = m.header }, nil
  for _, f in ipairs(m.files) do
    if not failure then
      local r, verr = jsonl.validate(f.path, { endpoint = opts.endpoint, limits = opts.limits, region = opts.region })
      if r then merge(rep, r, rep.lines) else failure = verr end
    end
    os.remove(f.path)
  end
  if failure then return nil, failure end
  rep.ok = #rep.problems == 0
  return rep
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

--- One CSV row per result record.
-- @param reader a `results` reader, or the options of `results.open`
-- @tparam string csv_path
-- @tparam[opt] table opts bom, columns (default `csv.COLUMNS`; "usage" is
-- prompt/completion/total tokens, "input" the request's user text when
-- the reader is joined with inputs), header (the first row's names)
-- @treturn integer the number of records, or nil and an error. The file is
-- written whole or not at all (beside it, then renamed over it), every cell
-- valid UTF-8 (bad bytes and NUL as U+FFFD: `results.repair`)
-- @treturn integer the records that had a cell repaired
function M.from_results(reader, csv_path, opts)
  errors.check("csv.from_results", "reader", reader, "table")
  errors.check("csv.from_results", "csv_path", csv_path, "string")
  opts = opts or {}
  if getmetatable(reader) == nil then
    local r, err = results.open(reader)
    if not r then return nil, err end
    reader = r
  end
  local columns = opts.columns or M.COLUMNS
  local function fill(fh)
    if opts.bom then
      local ok, msg = fh:write(BOM)
      if not ok then return nil, errors.io("cannot write", csv_path, msg) end
    end
    local w = setmetatable({ fh = fh, n = 0, path = csv_path }, Writer)
    local ok, werr = w:row(opts.header or columns)
    if not ok then return nil, werr end
    local n, repaired = 0, 0
    for rec, rerr in reader:each() do
      if not rec then return nil, rerr end
      local row, changed = {}, false
      for i, name in ipairs(columns) do
        local c
        row[i], c = results.sanitize(cell(rec, name), true)
        changed = changed or c
      end
      if changed then repaired = repaired + 1 end
      ok, werr = w:row(row, #columns)
      if not ok then return nil, werr end
      n = n + 1
    end
    return n, repaired
  end
  return results.write_whole(csv_path, fill)
end

return M
