--- `lbatch report`: one self-contained HTML page (inline SVG, no network)
-- for a pipeline's directory: a timeline of its shards from create to end,
-- requests by outcome and error code, tokens and cost by model, and the
-- slowest jobs. Read from the journal (`journal.jsonl`) and the shards'
-- result files (`lbatch.results` summary).
-- @module lbatch.cmd.report
local results = require "lbatch.results"
local errors = require "lbatch.impl.transport.errors"

local M = {}

local function esc(s)
  return (tostring(s):gsub("[&<>\"']", { ["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;",
                                          ["'"] = "&#39;" }))
end

--- A pipeline's journal, replayed (no result file read).
-- @tparam string dir the pipeline's dir (holding `journal.jsonl`)
-- @tparam[opt] table opts `journal` (its path)
-- @treturn table `{run, phase, shards}`, or nil and an error
function M.journal(dir, opts)
  opts = opts or {}
  local path = opts.journal or (dir .. "/journal.jsonl")
  local st, err = require("lbatch.impl.orchestration.journal").read_pipeline(path)
  if not st and err.code == "journal_newer" then return nil, err end
  if not st then
    return nil, errors.new({ kind = "io", code = "no_journal", message = "report: " .. err.message })
  end
  return st
end

--- The summary (`results:summary`) of the result files the shards
-- downloaded so far. When every such shard's batch reported its `usage`
-- (OpenAI's batch object, since September 2025), the tokens and cost are
-- the batches' (what the service bills), the lines' sum `lines_usage`.
-- @tparam table shards the journal's shards
-- @tparam[opt] table opts `prices`
-- @treturn ?table the summary (nil when nothing was downloaded yet), or nil and an error
-- @treturn ?table or the error
function M.summary(shards, opts)
  local outs, errs, batches = {}, {}, {}
  for _, s in pairs(shards) do
    if s.output then outs[#outs + 1] = s.output end
    if s.error then errs[#errs + 1] = s.error end
    if s.output or s.error then batches[#batches + 1] = s end    -- its usage, model and counts
  end
  if #outs + #errs == 0 then return nil end
  local r, err = results.open({ output = outs, errors = errs })
  if not r then return nil, err end
  local sm, serr = r:summary({ prices = opts and opts.prices, batches = batches })
  if r.close then r:close() end
  if not sm then return nil, serr end
  return sm
end

--- Read a pipeline's directory: its journal and the summary of its results.
-- @tparam string dir the pipeline's dir (holding `journal.jsonl`)
-- @tparam[opt] table opts `prices` (as `results.summary`'s), `journal` (its path)
-- @treturn table `{run, phase, shards, summary}`, or nil and an error
function M.read(dir, opts)
  opts = opts or {}
  local st, err = M.journal(dir, opts)
  if not st then return nil, err end
  st.summary, err = M.summary(st.shards, opts)
  if err then return nil, err end
  return st
end

-- a horizontal bar chart: rows of {label, value}; id names the chart
local function bars(id, rows, unit)
  local max = 0
  for _, r in ipairs(rows) do max = math.max(max, r[2]) end
  local h = 22 * #rows + 10
  local t = { ('<svg id="%s" class="chart" width="640" height="%d">'):format(id, h) }
  for i, r in ipairs(rows) do
    local y = 5 + (i - 1) * 22
    local w = max > 0 and math.max(1, math.floor(r[2] / max * 380)) or 1
    t[#t + 1] = ('<text x="0" y="%d" font-size="12">%s</text>'):format(y + 14, esc(r[1]))
    t[#t + 1] = ('<rect class="bar" data-label="%s" data-value="%s" x="200" y="%d" width="%d" height="16" fill="%s"/>')
      :format(esc(r[1]), esc(r[2]), y, w, r[3] or "#4a7")
    t[#t + 1] = ('<text x="%d" y="%d" font-size="12">%s%s</text>'):format(205 + w, y + 14, esc(r[2]), unit or "")
  end
  t[#t + 1] = "</svg>"
  return table.concat(t, "\n")
end

-- the timeline: a bar a shard from its batch's create to its end
local function timeline(shards)
  local t0, t1 = math.huge, -math.huge
  for _, s in ipairs(shards) do
    local tm = s.times or {}
    if tm.created then t0 = math.min(t0, tm.created) t1 = math.max(t1, tm.ended or tm.created) end
  end
  if t0 == math.huge then return "<p>No shard has a batch yet.</p>" end
  local span = math.max(t1 - t0, 1)
  local t = { ('<svg id="timeline" class="chart" width="640" height="%d">')
    :format(22 * #shards + 10) }
  for i, s in ipairs(shards) do
    local tm, y = s.times or {}, 5 + (i - 1) * 22
    t[#t + 1] = ('<text x="0" y="%d" font-size="12">%s</text>'):format(y + 14, esc(s.name or ("shard " .. i)))
    if tm.created then
      local w = math.max(2, math.floor(((tm.ended or t1) - tm.created) / span * 400))
      local x = math.min(200 + math.floor((tm.created - t0) / span * 400), 600 - w)   -- (a bar at the end: inside)
      t[#t + 1] = ('<rect class="bar shard" data-status="%s" x="%d" y="%d" width="%d" height="16" fill="%s">'
        .. '<title>%s: %s, %ds</title></rect>'):format(esc(s.status or "?"), x, y, w,
        s.status == "completed" and "#4a7" or "#c54", esc(s.name or i), esc(s.status or "?"),
        (tm.ended or t1) - tm.created)
    end
  end
  t[#t + 1] = "</svg>"
  return table.concat(t, "\n")
end

--- Where the tokens come from, when the batches' usage and the lines' sum
-- disagree (the batches' wins: it is what the service bills); "" else.
-- @tparam table sm a summary
-- @treturn string an HTML paragraph, or ""
function M.usage_note(sm)
  local l = sm.usage_source == "batch" and sm.usage_differs and sm.lines_usage
  if not l then return "" end
  return ('<p id="usage-note">Tokens and cost are the batches\' own usage (%d in, %d out), as the service bills '
    .. 'them; the result lines sum to %d in, %d out%s.</p>'):format(sm.prompt_tokens, sm.completion_tokens,
    l.prompt_tokens, l.completion_tokens, (l.cost or 0) > 0 and (", cost %.6f"):format(l.cost) or "")
end

--- The page's HTML.
-- @tparam table st what @{read} returns
-- @treturn string a whole HTML document, with no external resource
function M.html(st)
  local shards = {}
  for k in pairs(st.shards) do shards[#shards + 1] = k end
  table.sort(shards)
  for i, k in ipairs(shards) do shards[i] = st.shards[k] end
  local sm = st.summary or { total = 0, ok = 0, failed = 0, missing = 0, by_code = {}, by_model = {} }
  local outcome = { { "ok", sm.ok or 0, "#4a7" }, { "failed", (sm.failed or 0) - (sm.missing or 0), "#c54" },
                    { "missing", sm.missing or 0, "#888" } }
  local codes = {}
  for code, n in pairs(sm.by_code or {}) do codes[#codes + 1] = { code, n, "#c54" } end
  table.sort(codes, function(a, b) return a[2] > b[2] or (a[2] == b[2] and a[1] < b[1]) end)
  local tokens, costs = {}, {}
  for model, m in pairs(sm.by_model or {}) do
    tokens[#tokens + 1] = { model, (m.prompt_tokens or 0) + (m.completion_tokens or 0), "#47a" }
    if m.cost then costs[#costs + 1] = { model, m.cost, "#a74" } end
  end
  table.sort(tokens, function(a, b) return a[1] < b[1] end)
  table.sort(costs, function(a, b) return a[1] < b[1] end)
  local slow = {}
  for _, s in ipairs(shards) do
    local tm = s.times or {}
    if tm.created and tm.ended then slow[#slow + 1] = s end
  end
  table.sort(slow, function(a, b) return a.times.ended - a.times.created > b.times.ended - b.times.created end)
  local rows = {}
  for i = 1, math.min(10, #slow) do
    local s = slow[i]
    local c = type(s.counts) == "table" and s.counts or {}
    rows[#rows + 1] = ("<tr><td>%s</td><td>%s</td><td>%s</td><td>%ds</td><td>%s/%s</td></tr>"):format(
      esc(s.name or "?"), esc(s.batch_id or "-"), esc(s.status or "?"), s.times.ended - s.times.created,
      esc(c.completed or 0), esc(c.total or 0))
  end
  return table.concat({
    "<!DOCTYPE html>", '<html><head><meta charset="utf-8"><title>lbatch report ' .. esc(st.run or "") .. "</title>",
    "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px;text-align:left}</style></head><body>",
    ("<h1>lbatch report: run %s</h1>"):format(esc(st.run or "?")),
    ('<p id="totals">%d shards, phase %s; <span id="requests">%d</span> requests: <span id="ok">%d</span> ok, '
      .. '<span id="failed">%d</span> failed; %d tokens%s</p>'):format(#shards, esc(st.phase or "running"),
      sm.total or 0, sm.ok or 0, sm.failed or 0, sm.total_tokens or 0,
      sm.cost and ("; cost " .. ("%.6f"):format(sm.cost)) or ""),
    M.usage_note(sm),
    "<h2>Timeline</h2>", timeline(shards),
    "<h2>Requests by outcome</h2>", bars("outcomes", outcome),
    "<h2>Failures by error code</h2>", #codes > 0 and bars("codes", codes) or "<p>No failures.</p>",
    "<h2>Tokens by model</h2>", #tokens > 0 and bars("tokens", tokens) or "<p>No tokens.</p>",
    "<h2>Cost by model</h2>", #costs > 0 and bars("costs", costs) or "<p>No prices given.</p>",
    '<h2>Slowest jobs</h2><table id="slowest"><tr><th>shard</th><th>batch</th><th>status</th><th>took</th>'
      .. "<th>done</th></tr>", table.concat(rows, "\n"), "</table>", "</body></html>", "" }, "\n")
end

--- Write the report of a directory.
-- @tparam string dir the pipeline's dir
-- @tparam string output the HTML file to write
-- @tparam[opt] table opts as @{read}'s
-- @treturn table what @{read} returned, or nil and an error
function M.write(dir, output, opts)
  local st, err = M.read(dir, opts)
  if not st then return nil, err end
  local f, ferr = io.open(output, "wb")
  if not f then
    return nil, errors.new({ kind = "io", code = "write_failed", message = "report: " .. tostring(ferr) })
  end
  f:write(M.html(st))
  f:close()
  return st
end

return M
