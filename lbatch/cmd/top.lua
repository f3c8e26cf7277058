--- `lbatch top`: a live, full-screen view of the account's batches.
-- One row a job (id, status, a bar of requests done and failed, age, time
-- left at its rate so far), the totals above them. The list is read in
-- pages at most every `interval` seconds (the poll budget); between reads
-- only keys are handled, and only the lines that changed are redrawn.
-- Keys: `q` quits, `s` sorts, `f` filters by status, up/down or `j`/`k`
-- select, `c` then `y` cancels the selected job.
--
-- With `dir`, the view is one pipeline run's, from its journal: its
-- batches (by `metadata.lbatch_run`, or the ids the journal holds), a row
-- for each shard not created yet (its step), and the failures by code of
-- the error files it downloaded. The totals: jobs by status, requests
-- done and failed and their rate, failures by code, tokens and (with
-- `prices`) cost so far.
--
-- When stdout is not a terminal, one frame is printed as plain lines.
-- @module lbatch.cmd.top
local cost = require "lbatch.impl.formats.cost"
local service = require "lbatch.impl.api.service"

local M = {}

local STATUSES, ACTIVE = service.STATUSES, service.ACTIVE
local SORTS = { "age", "status", "progress", "eta" }

local dur = require("lbatch.impl.formats.size").duration

local function counts(b)
  local c = type(b.request_counts) == "table" and b.request_counts or {}
  return tonumber(c.total) or 0, tonumber(c.completed) or 0, tonumber(c.failed) or 0
end

--- A job's figures: requests total, done, failed, its age and time left.
-- @tparam table b a batch object
-- @tparam number now the time (Unix seconds)
-- @treturn table `{total, done, failed, age, rate, eta}` (rate in requests a second, eta in seconds or nil)
function M.figures(b, now)
  local total, done, failed = counts(b)
  local created = tonumber(b.created_at) or now
  local started = tonumber(b.in_progress_at) or created
  local rate, eta
  local ran = done + failed
  if ran > 0 and now > started then rate = ran / (now - started) end
  if ACTIVE[b.status] and rate and rate > 0 and total > ran then eta = (total - ran) / rate end
  if b.status == "completed" or b.status == "failed" then eta = 0 end
  return { total = total, done = done, failed = failed, age = now - created, rate = rate, eta = eta }
end

-- a bar of `width` cells: '#' done, 'x' failed, '.' to go
local function bar(f, width)
  if f.total <= 0 then return ("."):rep(width) end
  local d = math.floor(f.done * width / f.total + 0.5)
  local x = f.failed > 0 and math.max(1, math.floor(f.failed * width / f.total + 0.5)) or 0
  d = math.min(d, width - x)
  return ("#"):rep(d) .. ("x"):rep(x) .. ("."):rep(width - d - x)
end

local RANK = {}
for i, s in ipairs(STATUSES) do RANK[s] = i end

local function sorter(key, now)
  return function(a, b)
    local fa, fb = M.figures(a, now), M.figures(b, now)
    local va, vb
    if key == "status" then va, vb = RANK[a.status] or 99, RANK[b.status] or 99
    elseif key == "progress" then
      va = fa.total > 0 and (fa.done + fa.failed) / fa.total or 0
      vb = fb.total > 0 and (fb.done + fb.failed) / fb.total or 0
    elseif key == "eta" then va, vb = fa.eta or math.huge, fb.eta or math.huge
    else va, vb = -(tonumber(a.created_at) or 0), -(tonumber(b.created_at) or 0) end
    if va ~= vb then return va < vb end
    return tostring(a.id) < tostring(b.id)
  end
end

--- A new view's state.
-- @tparam[opt] table opts `status` (the service's filter, as `lbatch list --status`)
-- @treturn table the state that @{frame} draws and @{key} changes
function M.state(opts)
  opts = opts or {}
  return { batches = {}, sort = "age", filter = nil, selected = 1, top = 1, message = "",
           status = opts.status, samples = {}, prices = opts.prices, discount = opts.discount,
           models = {}, codes = {} }
end

-- the totals' figures: failures by code (the error files read: st.codes;
-- a failed job's errors.data), tokens, and cost at st.prices (of the
-- results a run downloaded, st.read, and the usage of the other jobs)
local function spent(st)
  local codes, counted, tokens, money, priced = {}, 0, 0, 0, false
  for code, n in pairs(st.codes) do codes[code] = n counted = counted + n end
  local read = st.read                  -- what the run's downloaded results hold
  if read then tokens, money, priced = read.tokens, read.cost, st.prices ~= nil end
  for _, b in ipairs(st.batches) do
    local data = type(b.errors) == "table" and type(b.errors.data) == "table" and b.errors.data or {}
    for _, e in ipairs(data) do
      local code = type(e) == "table" and e.code and (tostring(e.code) .. " (job)")
      if code then codes[code] = (codes[code] or 0) + 1 end
    end
    local u = type(b.usage) == "table" and not (read and read.ids[b.id]) and b.usage or {}
    local input = tonumber(u.input_tokens) or tonumber(u.prompt_tokens) or 0
    local output = tonumber(u.output_tokens) or tonumber(u.completion_tokens) or 0
    tokens = tokens + (tonumber(u.total_tokens) or input + output)
    local price = st.prices and st.prices[st.models[b.id] or b.model]
    if price then money, priced = money + cost.of(input, output, price, st.discount), true end
  end
  local list = {}
  for code, n in pairs(codes) do list[#list + 1] = { code, n } end
  table.sort(list, function(a, b) if a[2] ~= b[2] then return a[2] > b[2] end return a[1] < b[1] end)
  return list, counted, tokens, priced and money or nil
end

--- Take in a fresh list of batches (one refresh).
-- @tparam table st the state
-- @tparam {table,...} batches every batch the list pages gave
-- @tparam number now the time
function M.update(st, batches, now)
  local sel = st.rows and st.rows[st.selected] and st.rows[st.selected].id
  st.batches, st.read_at = batches, now
  local ran = 0
  for _, b in ipairs(batches) do
    local _, d, f = counts(b)
    ran = ran + d + f
  end
  local s = st.samples
  s[#s + 1] = { now, ran }
  while #s > 2 and s[#s][1] - s[1][1] > 30 do table.remove(s, 1) end   -- the rate over the last 30 s
  st.keep = sel
end

-- the rows shown: filtered and sorted
local function rows(st, now)
  local t = {}
  for _, b in ipairs(st.batches) do
    if not st.filter or b.status == st.filter then t[#t + 1] = b end
  end
  table.sort(t, sorter(st.sort, now))
  st.rows = t
  if st.keep then
    for i, b in ipairs(t) do if b.id == st.keep then st.selected = i end end
    st.keep = nil
  end
  st.selected = math.max(1, math.min(st.selected, #t))
  return t
end

--- The screen's lines.
-- @tparam table st the state
-- @tparam number width columns (80 or more is best)
-- @tparam number height lines
-- @tparam number now the time
-- @treturn {string,...} at most `height` lines, none wider than `width`
function M.frame(st, width, height, now)
  if height < 1 then return {} end        -- a terminal of no rows (stty rows 0): nothing to draw
  width = math.max(width, 40)
  local list = rows(st, now)
  local by, total, done, failed, tokens = {}, 0, 0, 0, 0
  for _, b in ipairs(st.batches) do
    by[b.status] = (by[b.status] or 0) + 1
    local t, d, f = counts(b)
    total, done, failed = total + t, done + d, failed + f
  end
  local jobs = {}
  for _, s in ipairs(STATUSES) do if by[s] then jobs[#jobs + 1] = by[s] .. " " .. s end end
  for s, n in pairs(by) do if not RANK[s] then jobs[#jobs + 1] = n .. " " .. tostring(s) end end
  local s, rps = st.samples, 0
  if #s >= 2 and s[#s][1] > s[1][1] then rps = math.max(0, (s[#s][2] - s[1][2]) / (s[#s][1] - s[1][1])) end
  local codes, counted, used, money = spent(st)
  tokens = math.max(tokens, used)
  local by_code = {}
  for _, c in ipairs(codes) do by_code[#by_code + 1] = c[2] .. " " .. c[1] end
  if failed > counted then
    by_code[#by_code + 1] = (failed - counted) .. (st.run and " not downloaded yet" or " in error files")
  end
  local lines = {
    ("lbatch top: %d jobs (%s)%s"):format(#st.batches, #jobs > 0 and table.concat(jobs, ", ") or "none",
      st.run and (" | run " .. st.run) or ""),
    ("requests: %d/%d done, %d failed, %.1f/s; tokens %d%s"):format(done, total, failed, rps, tokens,
      money and (", cost %.4f"):format(money) or ""),
    "failures: " .. (#by_code > 0 and table.concat(by_code, ", ") or "none"),
    ("sort %s | filter %s%s%s"):format(st.sort, st.filter or "all",
      st.status and (" (service: " .. st.status .. ")") or "",
      st.plain and "" or " | q quit s sort f filter j/k move c cancel"),   -- no keys off a terminal
  }
  local fixed = 46
  local idw = math.max(14, math.min(42, width - fixed - 10))
  local bw = math.max(10, math.min(60, width - fixed - idw))
  local fmt = "%s%-" .. idw .. "s %-11s %s %11s %5s %6s %6s"
  lines[#lines + 1] = fmt:format(" ", "id", "status", ("requests"):sub(1, bw) .. (" "):rep(bw - 8), "done/total",
    "fail", "age", "eta")
  local room = math.max(1, height - #lines - 1)
  if st.selected < st.top then st.top = st.selected end
  if st.selected >= st.top + room then st.top = st.selected - room + 1 end
  st.top = math.max(1, math.min(st.top, math.max(1, #list - room + 1)))
  for i = st.top, math.min(#list, st.top + room - 1) do
    local b = list[i]
    local f = M.figures(b, now)
    lines[#lines + 1] = fmt:format(i == st.selected and ">" or " ", tostring(b.id):sub(1, idw),
      tostring(b.status):sub(1, 11), bar(f, bw), ("%d/%d"):format(f.done, f.total):sub(1, 11), f.failed,
      dur(f.age), dur(f.eta))
  end
  while #lines < height - 1 do lines[#lines + 1] = "" end
  while #lines > height - 1 do lines[#lines] = nil end   -- a short screen: the message line stays
  lines[#lines + 1] = st.message
  for i, l in ipairs(lines) do lines[i] = l:sub(1, width) end
  return lines
end

--- Handle one key.
-- @tparam table st the state
-- @tparam string k the key: a character, or "up", "down"
-- @tparam function cancel `cancel(id)` returns the batch or nil and an error
-- @treturn string "quit" to stop, else nil
function M.key(st, k, cancel)
  if st.confirm then
    local id = st.confirm
    st.confirm = nil
    if k == "y" then                      -- y alone spends: every other key keeps the job
      local b, err = cancel(id)
      if b then
        st.message = ("cancel %s: %s"):format(id, tostring(b.status))
        for i, x in ipairs(st.batches) do if x.id == id then st.batches[i] = b end end
      else
        st.message = ("cancel %s failed: %s"):format(id, tostring(err))
      end
    else
      st.message = "kept " .. id
    end
    return nil
  end
  if k == "q" or k == "\3" then return "quit" end
  if k == "j" or k == "down" then st.selected = st.selected + 1
  elseif k == "k" or k == "up" then st.selected = math.max(1, st.selected - 1)
  elseif k == "s" then
    for i, s in ipairs(SORTS) do if s == st.sort then st.sort = SORTS[i % #SORTS + 1] break end end
    st.message = "sorted by " .. st.sort
  elseif k == "f" then
    local present = {}
    for _, b in ipairs(st.batches) do present[b.status] = true end
    local order = { false }
    for _, s in ipairs(STATUSES) do if present[s] then order[#order + 1] = s end end
    local at = 1
    for i, s in ipairs(order) do if s == (st.filter or false) then at = i end end
    st.filter = order[at % #order + 1] or nil
    st.selected, st.top = 1, 1
    st.message = "filter " .. (st.filter or "all")
  elseif k == "c" then
    local b = st.rows and st.rows[st.selected]
    if b and b.shard then
      st.message = ("%s has no batch yet"):format(b.id)
    elseif b then
      st.confirm = b.id
      st.message = ("cancel %s? y to confirm, any other key keeps it"):format(b.id)
    end
  end
  return nil
end

local function sh_ok(cmd)
  local ok = os.execute(cmd)
  return ok == true or ok == 0
end

local function term_size()
  local p = io.popen("stty size < /dev/tty 2>/dev/null")
  local out = p and p:read("*a") or ""
  if p then p:close() end
  local h, w = out:match("(%d+)%s+(%d+)")
  return tonumber(w) or 80, tonumber(h) or 24
end

-- a run's journal read again: the models of its batches, a row for each
-- shard not created yet, and (when the downloads changed) the failures by
-- code of its error files
local function journal(st, dir)
  local report = require "lbatch.cmd.report"
  local j, err = report.journal(dir)
  if not j then return nil, err end
  st.run, st.ids, st.models = j.run, {}, {}
  local waiting, files, downloaded = {}, {}, {}
  for k, sh in pairs(j.shards) do
    if sh.batch_id then
      st.ids[sh.batch_id], st.models[sh.batch_id] = true, sh.model
      if sh.output or sh.error then downloaded[sh.batch_id] = true end
    elseif sh.step ~= "done" then
      waiting[#waiting + 1] = { id = sh.name or ("shard " .. k), status = sh.step, shard = true,
                                request_counts = { total = sh.lines } }
    end
    files[#files + 1] = (sh.output or "") .. "|" .. (sh.error or "")
  end
  table.sort(files)
  local key = table.concat(files, "\n")
  if key ~= st.files then
    local sm, serr = report.summary(j.shards, { prices = st.prices })
    if serr then return nil, serr end
    st.files, st.codes = key, sm and sm.by_error or {}
    st.read = { ids = downloaded, tokens = sm and sm.total_tokens or 0, cost = sm and sm.cost or 0 }
  end
  return waiting
end

-- every batch the list pages give (with `dir`, the run's), or nil and an error
local function read_all(c, st, dir)
  local all, waiting = {}, nil
  if dir then
    local err
    waiting, err = journal(st, dir)
    if not waiting then return nil, err end
  end
  for b, err in c:each_batch({ limit = 100, status = st.status }) do
    if not b then return nil, err end
    local m = type(b.metadata) == "table" and b.metadata or {}
    if not dir or st.ids[b.id] or (m.lbatch_run ~= nil and m.lbatch_run == st.run) then all[#all + 1] = b end
  end
  for _, w in ipairs(waiting or {}) do all[#all + 1] = w end
  return all
end

-- the view as plain text, once (stdout is not a terminal): 0
local function print_once(st, all, now)
  st.plain = true
  local w = tonumber(os.getenv("COLUMNS")) or 100
  local lines = M.frame(st, w, #all + 6, now)
  while lines[#lines] == "" do lines[#lines] = nil end
  io.stdout:write(table.concat(lines, "\n"), "\n")
  return 0
end

-- the terminal in raw mode on the alternate screen: { restore, getc, draw }
-- (restore puts the terminal back as it was, once, however the view ends:
-- q, an error, a signal, the command's client calling opts.restore)
local function screen(st)
  local p = io.popen("stty -g < /dev/tty")
  local saved = p:read("*l")
  p:close()
  local out, tty, raw, shown, size = io.stdout, nil, true, {}, nil
  local s = {}
  function s.restore()
    if not raw then return end
    raw = false
    if tty then tty:close() tty = nil end
    out:write("\27[?25h\27[?1049l")
    out:flush()
    out:setvbuf("line")
    sh_ok("stty " .. (saved or "sane") .. " < /dev/tty")
  end
  function s.getc()
    if not tty then
      tty = io.open("/dev/tty", "rb")
      if not tty then return nil end
      tty:setvbuf("no")
    end
    local ch = tty:read(1)
    if not ch then tty:close() tty = nil end   -- a timeout reads as end of file, which sticks: open again
    return ch
  end
  -- a frame in one write: a terminal (or tmux's capture) never shows half
  -- of a new frame over the old one
  function s.draw()
    local w, h = term_size()
    local buf = {}
    if size ~= w .. "x" .. h then size, shown = w .. "x" .. h, {} buf[1] = "\27[2J" end
    local lines = M.frame(st, w, h, os.time())
    for i = 1, h do
      local l = lines[i] or ""
      if shown[i] ~= l then buf[#buf + 1] = ("\27[%d;1H%s\27[K"):format(i, l) shown[i] = l end
    end
    if #buf > 0 then out:write(table.concat(buf)) out:flush() end
  end
  sh_ok("stty -icanon -echo -isig min 0 time 1 < /dev/tty")
  out:setvbuf("full", 65536)
  out:write("\27[?1049h\27[?25l\27[2J")
  out:flush()
  return s
end

-- keys and list reads until q (nil) or a trapped signal (128 + its number)
local function loop(c, st, opts, scr, interval)
  local core = require "lbatch.core"
  local read_at = core.now()
  scr.draw()
  while true do
    local sig = core.caught()          -- SIGTERM (or SIGINT) the command trapped
    if sig then return 128 + sig end
    local ch = scr.getc()
    if ch == "\27" then
      local a, b = scr.getc(), scr.getc()
      ch = (a == "[" or a == "O") and (b == "A" and "up" or b == "B" and "down") or nil
    end
    if ch then
      if M.key(st, ch, function(id) return c:cancel(id) end) == "quit" then return end
      scr.draw()
    end
    local t = core.now()
    if t - read_at >= interval then
      read_at = t
      local fresh, rerr = read_all(c, st, opts.dir)
      if fresh then M.update(st, fresh, os.time()) else st.message = "list: " .. tostring(rerr) end
      scr.draw()
    end
  end
end

--- Run the view until `q`, SIGTERM or SIGINT (or one frame when stdout is
-- not a terminal); the terminal is restored however it ends (while the
-- view runs, `opts.restore` is the function that restores it).
-- @tparam table c a client (`each_batch`, `cancel`)
-- @tparam[opt] table opts `status` (the service's filter), `interval` (seconds between list reads, default
-- 5), `dir` (one pipeline run's, from its journal), `prices` (as `lbatch.estimate`'s: the cost so far), `discount`
-- @treturn integer 0 (q), 128 + the signal's number, or nil and an error
function M.run(c, opts)
  opts = opts or {}
  local interval = math.max(tonumber(opts.interval) or 5, 0.5)
  local st = M.state(opts)
  local all, err = read_all(c, st, opts.dir)
  if not all then return nil, err end
  M.update(st, all, os.time())
  if not sh_ok("[ -t 1 ]") then return print_once(st, all, os.time()) end
  local scr = screen(st)
  opts.restore = scr.restore
  local ok, perr = pcall(loop, c, st, opts, scr, interval)
  scr.restore()
  opts.restore = nil
  if not ok then error(perr, 0) end
  if perr then io.stderr:write("lbatch: interrupted\n") end
  return perr or 0
end

return M
