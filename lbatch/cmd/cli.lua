--- The lbatch command. `main(args)` returns the exit code:
-- 0 done, 1 a failure (the service, a file, problems found),
-- 2 wrong usage, 3 a batch that ended failed, expired or cancelled, 4 a
-- run's canary that failed its check (nothing past it sent: EXIT_OF_KIND).
-- Each command returns its exit code, or nil and an error object.
-- @module lbatch.cmd.cli
local cjson = require "cjson"
local json = require "lbatch.json"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local csv = require "lbatch.csv"
local pipeline = require "lbatch.pipeline"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"

local M = {}

local function usage_error(msg)
  return errors.new({ kind = "invalid", code = "usage", message = msg })
end

-- every endpoint lbatch knows (service.ENDPOINT_RULES), sorted, wrapped
-- for a help line whose text starts at column `indent`
local function endpoint_list(indent)
  local urls = {}
  for url in pairs(service.ENDPOINT_RULES) do urls[#urls + 1] = url end
  table.sort(urls)
  local lines, line = {}, ""
  for i, url in ipairs(urls) do
    local word = url .. (i == #urls - 1 and " or" or i < #urls and "," or "")
    if #line > 0 and indent + #line + 1 + #word > 78 then lines[#lines + 1], line = line, word
    else line = #line > 0 and line .. " " .. word or word end
  end
  lines[#lines + 1] = line
  return table.concat(lines, "\n" .. (" "):rep(indent))
end

local GLOBAL = [[
Options for every command:
  --base-url URL     the API (default: $LBATCH_BASE_URL, else the region's)
  --region R         cn (default), intl or openai (moonshot: intl or cn)
  --provider P       dashscope (default), openai, azure, groq, together, siliconflow,
                     zhipu, moonshot, cerebras, novita or litellm: its URL, key and limits
  --workspace ID     a DashScope workspace's own domain (with --region cn or intl:
                     https://ID.cn-beijing.maas.aliyuncs.com, https://ID.ap-southeast-1...);
                     the key goes to that host alone (not with --base-url)
  --json             machine-readable output on stdout
  -h, --help         this help
The key comes from the provider's variable ($DASHSCOPE_API_KEY, $OPENAI_API_KEY,
$GROQ_API_KEY, ...); without --provider or --region, the key set names the provider.]]

local COMMANDS = {
  run = { args = "INPUT", help = [[
Run a whole job, resumable: shard, upload, create, wait, download, merge.
INPUT is .jsonl requests or a .csv of id,content (every row a request, but
a first row that is a header, as csv2jsonl says). Killed and started again
with the same --dir, it resumes where it stopped. Run again once done with
rows added, changed or removed, it sends only the new and changed rows and
its results are exactly INPUT's rows; with another --model, --system,
--endpoint, --limits or --header it stops and says what changed (--fresh,
--reuse).
  --dir DIR            work directory and journal (default: INPUT.lbatch)
  --wait-lock SECONDS  wait that long for another run on DIR to end (default: stop at once)
  --recover-window SECONDS  how long an upload or a create in flight when an earlier
                       run died is looked for before it is sent again (default 45)
  --output FILE        merged results, .csv or .jsonl (default: DIR/results.jsonl)
  --model M            model (needed for a CSV)
  --system TEXT        system prompt (CSV)
]] .. "  --endpoint E         " .. endpoint_list(23) .. "\n" .. [[
  --limits L           the rules the shards are written to (as validate's)
  --max-in-flight N    jobs at once (default 8)
  --max-lines N        lines per shard (default 50000)
  --window W           completion window (default 24h)
  --poll SECONDS       first poll interval (default $LBATCH_POLL_INTERVAL, else 60)
  --resubmit           run again what did not run (expired, cancelled), lines that
                       failed for a reason that may pass (429, 5xx) and answers that
                       are not the JSON their request asked for (invalid_answer)
  --header             a CSV's first row is a header (default: when it looks like one)
  --no-header          a CSV's first row is a request
  --max-cost X         refuse the run (before any upload) when it may cost more
  --prices FILE        the prices --max-cost needs (as estimate's --prices)
  --canary N           first run N requests spread evenly over INPUT (the same N
                       on every run), check their answers, and send the rest only
                       when enough pass; else stop, nothing more sent (exit 4)
  --canary-check FILE.lua  FILE returns function(record) -> ok, why: the check of
                       each canary answer (beside its status; an error counts as a fail)
  --canary-min-ok X    the share of the canary that must pass (default 0.95)
  --bom                a byte-order mark in a CSV output
  --fresh              DIR holds a run made with other options (another model, system
                       prompt, ...): start a new run there (the old journal is kept)
  --reuse              DIR holds a run made with other options: keep the answers whose
                       request line is unchanged (with another model or system prompt,
                       none: every request is sent again) and send the others
  --notify-listen HOST:PORT  be told when a job ends: listen there for OpenAI's
                       webhooks (secrets: $OPENAI_WEBHOOK_SECRET, several
                       separated by spaces) and DashScope's callbacks, on
                       lua-http (LuaJIT, Lua 5.1 to 5.3); polling stays as the
                       fallback at --poll's interval
  --notify-url URL     the URL the service reaches that listener by: set as each
                       DashScope batch's callback (OpenAI's comes from the
                       project's webhook settings)
  --via batch-chat     send each request as a held call of DashScope's Batch Chat
                       (Beijing; half price), not in a file batch: answers are
                       written as they come, a run again sends only the rest
  --concurrency N      Batch Chat calls at once (default 100)
  --batch-chat-wait S  seconds the service holds each call, 60 to 3600 (default 3600)
  --batch-chat-url URL the Batch Chat base URL (default the provider's)]] },
  flow = { args = "SCRIPT", help = [[
Run a flow: SCRIPT returns {step = function(item, ask) ... end, key = ...}
(lbatch.flow), each item's steps as plain Lua, the asks sent in rounds of
batches. Killed and started again with the same --dir, it goes on where
it stopped: no ask is sent twice.
  --items FILE         the items: a .csv with a header row, or .jsonl objects (required)
  --dir DIR            work directory and journal (default: FILE.flow)
  --wait-lock SECONDS  wait that long for another flow on DIR to end (default: stop at once)
  --recover-window SECONDS  how long an upload or a create in flight when an earlier
                       run died is looked for before it is sent again (default 45)
  --output FILE        the results, one JSON line an item (default: DIR/results.jsonl)
  --model M            the model of asks that name none
  --limits L           the rules the shards are written to (as validate's)
  --max-in-flight N    jobs at once (default 8)
  --max-lines N        lines per shard (default the limits')
  --poll SECONDS       first poll interval (default $LBATCH_POLL_INTERVAL, else 60)
  --ask-again          ask again what the step now asks differently (default: stop, naming it)
  --max-cost X         stop before a round that may bring the cost past X
  --prices FILE        the prices --max-cost needs (as estimate's --prices)
  --finish-realtime N  a round of at most N asks goes through the real-time
                       endpoint at full price, not a batch (an ask in flight
                       when the process is killed may be asked again)
  --flush N,S          items at their own pace: a pass starts, while other shards
                       are out, once the shards back hold N answers or S seconds
                       after the oldest came back (N or S may be empty)]] },
  adopt = { args = "INPUT", help = [[
Rebuild a lost journal from the account, so that run resumes without paying twice.
INPUT and the sharding options are run's; the shards are matched to the
files and batches of run RUN (its batches' metadata.lbatch_run).
  --run RUN            the run's id (the prefix of its files' names)
  --dir DIR            work directory (default: INPUT.lbatch)
  --wait-lock SECONDS  wait that long for another run on DIR to end (default: stop at once)
  --model M            model (needed for a CSV)
  --system TEXT        system prompt (CSV)
  --endpoint E         as run's
  --limits L           as run's
  --max-lines N        as run's (default: what the run's shards hold)
  --header             as run's
  --no-header          as run's
  --window W           as run's: its batches' window is checked
  --canary N           as run's: a canary run is cut as it was (its batches say
                       so: adopt refuses one without its --canary N)
  --canary-check FILE.lua  as run's: a canary not yet judged is judged by the next
                       run, which needs the check again
  --canary-min-ok X    as run's]] },
  submit = { args = "FILE", help = [[
Upload FILE (with progress) and create a batch from it; prints the batch.
FILE is checked first as validate checks it: nothing is sent when it has
problems. The same submit again (same file, endpoint, window and metadata)
finds the batch it made and prints it instead of making a second one.
  --endpoint E   (default: the url of the file's first line)
  --window W     completion window (default 24h)
  --meta K=V     metadata, repeatable
  --limits L     the rules FILE is checked against (as validate's)
  --again        upload again and make a new batch, even when one was made
  --no-check     send FILE without checking it]] },
  status = { args = "BATCH_ID", help = [[
Show a batch.
  --wait            wait until it is final, with progress
  --poll SECONDS    first poll interval when waiting (default $LBATCH_POLL_INTERVAL, else 60)]] },
  list = { args = "", help = [[
List batches, newest first.
  --limit N       (default 20)
  --status S      comma-separated statuses
  --all           follow has_more to the end]] },
  cancel = { args = "BATCH_ID", help = "Cancel a batch." },
  download = { args = "ID", help = [[
Download a file, or a batch's output and error files (by batch id).
Shows progress; an interrupted download leaves nothing behind.
  --output PATH   where the file (or the batch's output) goes
  --errors PATH   where a batch's error file goes]] },
  validate = { args = "FILE", help = [[
Check a request file against the service's rules without uploading it.
Exit 1 when problems are found. Warnings (a model outside the --region's
batch list: lists change) go to stderr and do not change the exit code.
  --endpoint E    the batch endpoint to check urls against
  --model M       a CSV of id,content (required for one): checked as the
                  requests it makes (--header, --no-header as csv2jsonl)
  --limits L      dashscope (default; openai with --region openai; the
                  --provider's own), dashscope-strict (the older 1 MB lines),
                  openai or a provider's (azure, groq, together, ...)]] },
  estimate = { args = "FILE...", help = [[
Count requests, tokens (approximate) and cost at batch prices.
Reads request files line by line: requests per model and endpoint, input
tokens, the most output tokens the requests allow, and with --prices
their cost at batch prices.
  --prices FILE   JSON {"MODEL": {"input": P, "output": P}}: real-time
                  prices in currency units per million tokens
  --discount X    batch price / real-time price (default 0.5)
Input tokens are an approximation, not the model's tokenizer: 1 per CJK
character, 1 per 4 other characters (rounded up per model), counting the
messages' content (strings and text parts), input and prompt. The output
bound is the sum of max_tokens (or max_completion_tokens, max_output_tokens;
0 for embeddings); it is unknown for a model when a request sets none.]] },
  results = { args = "OUTPUT", help = [[
Read an output file (with --errors, --inputs) and write one row per request.
  --errors FILE   the error file
  --inputs FILE   the input file: rows in input order, missing ones named
  --csv FILE      write CSV (else JSONL on stdout)
  --bom           a byte-order mark in the CSV]] },
  csv2jsonl = { args = "CSV JSONL", help = [[
Turn a CSV (first column custom_id, second the content) into request files.
Every row is a request, but a first row that is a header (cells such as
id or custom_id, then content, prompt, question or text): it is skipped
and a line says so. --header skips the first row whatever it holds,
--no-header sends it whatever it holds.
  --model M (required)  --system TEXT  --endpoint E  --max-lines N
  --header  --no-header
  --limits L            the rules the files are written to (as validate's)]] },
  files = { args = "", help = [[
List stored files, newest first: id, purpose, size, age, name.
  --limit N        (default 100)
  --purpose P      only this purpose (batch, batch_output, ...)
  --all            follow has_more to the end]] },
  rm = { args = "FILE_ID...", help = [[
Delete files. Exit 1 when one could not be deleted.]] },
  top = { args = "", help = [[
A live, full-screen view of the account's batches: one row a job, totals above
(jobs by status, requests and their rate, failures by code, tokens and cost).
Keys: q quit, s sort, f filter by status, up/down or j/k select, c then y
cancel the selected job. When stdout is not a terminal, one frame as plain lines.
  --dir DIR        one run's: its journal's batches, shards not created yet, and
                   the failures by code of the error files it downloaded
  --status S       only these statuses (comma-separated), as list's
  --interval SECONDS  seconds between list reads (default 5)
  --prices FILE    as estimate's: the cost so far]] },
  report = { args = "DIR", help = [[
Write one self-contained HTML page (inline SVG) for a pipeline's DIR.
A timeline of its shards, requests by outcome and error code, tokens and
cost by model, the slowest jobs.
  --output FILE   the page (default: DIR/report.html)
  --prices FILE   as estimate's: the cost by model]] },
  prune = { args = "", help = [[
Delete files older than an age, and say how much space that freed. The
service keeps at most 10,000 files or 100 GB.
  --older-than AGE   e.g. 30d, 12h, 2w (required)
  --purpose P        batch and batch_output by default; "all" for every purpose
  --dry-run          list what would go, delete nothing]] },
}
local ORDER = { "run", "flow", "adopt", "submit", "status", "list", "cancel", "download", "validate", "estimate",
                "results", "csv2jsonl", "files", "rm", "prune", "top", "report" }

local BOOLEAN = { json = true, help = true, wait = true, all = true, resubmit = true, bom = true,
                  header = true, no_header = true, dry_run = true, ask_again = true,
                  again = true, no_check = true, fresh = true, reuse = true }

local function usage()
  local t = { "Usage: lbatch COMMAND [options]\n\nCommands:" }
  for _, name in ipairs(ORDER) do
    local first = COMMANDS[name].help:match("^(.-%.)%s") or COMMANDS[name].help:match("^[^\n]*")
    first = first:gsub("%s*\n%s*", " ")
    t[#t + 1] = ("  %-10s %-10s %s"):format(name, COMMANDS[name].args, first)
  end
  t[#t + 1] = "\n" .. GLOBAL .. "\nlbatch COMMAND --help shows a command's options; lbatch --version (-V) the version."
  return table.concat(t, "\n")
end

-- the options a command takes: those its help and GLOBAL name
local function options_of(cmd)
  local ok = {}
  for flag in (cmd.help .. GLOBAL):gmatch("%-%-(%l[%w%-]*)") do ok[flag:gsub("%-", "_")] = true end
  return ok
end

local function parse(args, ok)
  local o, pos, meta = {}, {}, {}
  local i = 1
  while i <= #args do
    local a = args[i]
    if a == "-h" then o.help = true
    elseif a:sub(1, 2) == "--" then
      local k, v = a:match("^%-%-([%w%-]+)=(.*)$")
      k = (k or a:sub(3)):gsub("%-", "_")
      if not ok[k] then return nil, "unknown option " .. a:gsub("=.*", "") end
      if not v and not BOOLEAN[k] then
        i = i + 1
        v = args[i]
        if v == nil then return nil, "--" .. k:gsub("_", "-") .. " needs a value" end
      end
      if k == "meta" then
        local mk, mv = (v or ""):match("^([^=]+)=(.*)$")
        if not mk then return nil, "--meta takes KEY=VALUE" end
        meta[mk] = mv
      else
        o[k] = v == nil and true or v
      end
    else
      pos[#pos + 1] = a
    end
    i = i + 1
  end
  o.meta = next(meta) and meta or nil
  return o, pos
end

-- the result on stdout (o.stdout: elsewhere, when stdout carries a download)
local function out(o, value, text)
  local f = o.stdout or io.stdout
  if o.json then f:write(json.encode(value), "\n")
  else f:write(text, "\n") end
end

-- o[k] as a number; nil, err when it is not one
local function num(o, k)
  local v = o[k]
  if v == nil then return nil end
  v = tonumber(v)
  if not v or v ~= v or v < 0 then return nil, usage_error("--" .. k:gsub("_", "-") .. " takes a number") end
  return v
end

-- the numeric options of a command, checked: a table, or nil and an error
local function nums(o, ...)
  local t = {}
  for _, k in ipairs({ ... }) do
    local v, err = num(o, k)
    if err then return nil, err end
    t[k] = v
  end
  return t
end

local function fmt_time(s) return require("lbatch.impl.formats.size").duration(s, "clock") end

local fmt_bytes = require("lbatch.impl.formats.size").human

local core = require "lbatch.core"
local now = core.now

-- A status line on stderr: redrawn in place on a terminal; in a pipe,
-- plain lines, at most one every `every` seconds (and the last one).
local function status_line(every)
  local tty = os.execute("[ -t 2 ]")
  tty = tty == true or tty == 0
  local last, shown_at = nil, -math.huge
  -- sig: what counts as a change (default the line)
  local function show(line, force, sig)
    sig = not tty and sig or line
    if sig == last then return end
    if not tty and not force and now() - shown_at < every then return end
    last, shown_at = sig, now()
    if tty then io.stderr:write("\r\27[K", line) else io.stderr:write(line, "\n") end
    io.stderr:flush()
  end
  local function finish() if tty and last then io.stderr:write("\n") io.stderr:flush() end end
  return show, finish, tty
end

-- A transfer's progress: bytes, rate and time left. Returns the
-- on_progress callback and a function that ends the line.
local function transfer_printer(label)
  local show, finish = status_line(5)
  local started, ended = now(), nil
  return function(done, total)
    local whole = total and total > 0 and done >= total
    if whole and ended == done then return end     -- the end once, however often it is reported
    ended = whole and done or nil
    local t = math.max(now() - started, 1e-3)
    local rate = done / t
    local line = ("%s: %s"):format(label, fmt_bytes(done))
    if total and total > 0 then
      line = line .. (" of %s (%d%%)"):format(fmt_bytes(total), math.floor(done * 100 / total))
    end
    line = line .. (", %s/s"):format(fmt_bytes(rate))
    if total and total > done and rate > 0 then line = line .. (", %s left"):format(fmt_time((total - done) / rate)) end
    show(line, total and done >= total)
  end, finish
end

-- a pipeline's progress: jobs by status, requests, and bytes moving. Off
-- a terminal, a plain line each time the jobs or requests change, without
-- the bytes moving (a line a chunk would flood a log).
local function progress_printer()
  local show, finish, tty = status_line(0)
  local moving, last_p = {}, nil
  local function draw()
    local p = last_p
    if not p then return end
    local jobs = {}
    for status, n in pairs(p.jobs) do jobs[#jobs + 1] = n .. " " .. status end
    table.sort(jobs)
    local sig = ("jobs: %s | requests %d/%d done, %d failed"):format(table.concat(jobs, ", "), p.completed,
      p.total, p.failed)
    local line = ("%s | %s elapsed%s"):format(sig, fmt_time(p.elapsed),
      p.eta and (", ~" .. fmt_time(p.eta) .. " left") or "")
    local done, total, n = 0, 0, 0
    for _, m in pairs(moving) do done, total, n = done + m[1], total + m[2], n + 1 end
    if n > 0 and tty then   -- a size not known yet (0) is not shown as "of 0 B"
      line = line .. " | moving " .. fmt_bytes(done) .. (total > 0 and (" of " .. fmt_bytes(total)) or "")
    end
    show(line, false, sig)
  end
  return function(p) last_p = p draw() end, finish, function(shard, _, done, total)
    total = total or 0                   -- (nil until the server has said it)
    if total > 0 and done >= total then moving[shard] = nil else moving[shard] = { done, math.max(total, 0) } end
    draw()
  end
end

local function batch_line(b)
  local c = b.request_counts or {}
  return ("%s  %-11s %d/%d done, %d failed  %s"):format(b.id, b.status, c.completed or 0, c.total or 0,
    c.failed or 0, b.output_file_id and ("output " .. b.output_file_id) or "")
end

-- A fresh run's input must be readable before its work directory is made:
-- a command that fails on its input leaves nothing behind. A dir that
-- exists (a run to resume) is left to the run. nil, or an error
local function unreadable(path, dir)
  if os.rename(dir, dir) then return nil end
  local f, msg = io.open(path, "rb")
  if f then f:close() return nil end
  return errors.io("cannot read", path, msg)
end

-- A run this command started in a new DIR that failed before anything was
-- sent (its input refused while sharding: its journal never left the
-- "sharding" phase) leaves nothing behind: what the pipeline wrote there
-- is removed, and DIR if it is then empty. Anything else stays.
local function unstarted(dir)
  local lock = core.lock(dir .. "/lock")     -- another run's directory (busy) is never touched
  if not lock then return end
  local fh = io.open(dir .. "/journal.jsonl", "rb")
  local text = fh and fh:read("*a") or ""
  if fh then fh:close() end
  local first, rest = text:match("^([^\n]*)\n?(.*)$")
  local ok, head = pcall(cjson.decode, first or "")
  if not (ok and type(head) == "table" and head.phase == "sharding") or rest:find("%S") then
    lock:release()
    return
  end
  for _, name in ipairs({ "journal.jsonl", "run.json", "requests.jsonl", "lock" }) do os.remove(dir .. "/" .. name) end
  lock:release()
  os.remove(dir)                -- only when empty
end

-- a batch's own errors (a refused file, a quota), one line each: code, line, message
local function error_lines(b)
  local data = type(b.errors) == "table" and type(b.errors.data) == "table" and b.errors.data or {}
  local t = {}
  for _, e in ipairs(data) do
    if type(e) == "table" then
      t[#t + 1] = ("  error %s%s: %s"):format(tostring(e.code or "?"),
        type(e.line) == "number" and (" line " .. ("%d"):format(e.line)) or "",
        type(e.message) == "string" and e.message or "")
    end
  end
  return t
end

local CHEAP_ERRORS = 1048576      -- an error file read for counts by code when no larger

-- the failed lines of a batch by code ("3 http_500, 1 invalid_model"), when
-- its error file is small enough to read at once; else nil
local function error_counts(c, b)
  local n = b.request_counts or {}
  if not b.error_file_id or (n.failed or 0) == 0 then return nil end
  local f = c:file(b.error_file_id)
  if not f or (f.bytes or math.huge) > CHEAP_ERRORS then return nil end
  local text = c:content(b.error_file_id)
  if type(text) ~= "string" then return nil end
  local by = {}
  for line in text:gmatch("[^\n]+") do
    local _, code = results.classify(results.record(line))
    if code then by[code] = (by[code] or 0) + 1 end
  end
  local t = {}
  for code, k in pairs(by) do t[#t + 1] = { code, k } end
  table.sort(t, function(x, y) if x[2] ~= y[2] then return x[2] > y[2] end return x[1] < y[1] end)
  for i, x in ipairs(t) do t[i] = ("%d %s"):format(x[2], x[1]) end
  return #t > 0 and table.concat(t, ", ") or nil
end

-- a batch as status shows it: its line, its errors, its failed lines by code
local function batch_text(c, b)
  local t = { batch_line(b) }
  for _, l in ipairs(error_lines(b)) do t[#t + 1] = l end
  local counts = error_counts(c, b)
  if counts then t[#t + 1] = "  failed lines: " .. counts end
  return table.concat(t, "\n")
end

-- the limits profile's name the options choose (--limits, else the
-- region's), or nil and a usage error
local function limits_of(o)
  if o.provider ~= nil and not service.PROVIDERS[o.provider] then
    return nil, usage_error("--provider must be one of " .. service.provider_names())
  end
  if o.region ~= nil and not service.REGIONS[o.region] and not o.provider then
    return nil, usage_error("--region must be cn, intl or openai")
  end
  if o.limits ~= nil and not service.PROFILES[o.limits] then
    return nil, usage_error("--limits must be one of " .. service.profile_names())
  end
  return o.limits or service.profile(o.provider or o.region).name
end

-- the commands by name: command.run is `lbatch run`
local command = {}

function command.validate(o, pos)
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local rep, err
  if pos[1]:lower():find("%.csv$") then       -- a CSV: the requests it makes (lbatch.csv)
    if not o.model then return nil, usage_error("--model is required for a CSV") end
    if o.header and o.no_header then return nil, usage_error("--header and --no-header exclude each other") end
    local header
    if o.header then header = true elseif o.no_header then header = false end
    rep, err = csv.validate(pos[1], { model = o.model, endpoint = o.endpoint, limits = limits, region = o.region,
                                      header = header })
  else
    rep, err = jsonl.validate(pos[1], { endpoint = o.endpoint, limits = limits, region = o.region })
  end
  if not rep then return nil, err end
  for _, w in ipairs(rep.warnings) do
    io.stderr:write(("%s:%s: warning: %s %s\n"):format(pos[1], w.line or "-", w.code, w.message))
  end
  local lines = {}
  for _, p in ipairs(rep.problems) do
    lines[#lines + 1] = p.line and ("%s:%s: %s %s"):format(pos[1], p.line, p.code, p.message)
      or ("%s: %s %s"):format(pos[1], p.code, p.message)
  end
  lines[#lines + 1] = ("%s: %d lines, %d bytes, %s; %d problem(s), %d warning(s) (%s)"):format(pos[1], rep.lines,
    rep.bytes, rep.model and ("model " .. rep.model) or "no model", #rep.problems, #rep.warnings, limits)
  rep.problems, rep.warnings = json.array(rep.problems), json.array(rep.warnings)   -- [] when none
  out(o, rep, table.concat(lines, "\n"))
  return rep.ok and 0 or 1
end

local function cost(v) return v and ("%.6f"):format(v) or "?" end

function command.estimate(o, pos)
  local n, nerr = nums(o, "discount")
  if not n then return nil, nerr end
  local rep, err = jsonl.estimate(pos, { prices = o.prices, discount = n.discount })
  if not rep then return nil, err end
  local names = {}
  for model in pairs(rep.models) do names[#names + 1] = model end
  table.sort(names, function(a, b)
    local ra, rb = rep.models[a].requests, rep.models[b].requests
    if ra ~= rb then return ra > rb end
    return a < b
  end)
  local rows = { { "model", "endpoint", "requests", "input tokens~", "output tokens max" } }
  if rep.priced then
    rows[1][6], rows[1][7] = "input cost", "output cost max"
  end
  local notes = {}
  for _, model in ipairs(names) do
    local m = rep.models[model]
    local urls = {}
    for url in pairs(m.endpoints) do urls[#urls + 1] = url end
    table.sort(urls)
    if #urls > 1 then   -- each endpoint's count
      for i, url in ipairs(urls) do urls[i] = ("%s (%d)"):format(url, m.endpoints[url]) end
    end
    local row = { model, table.concat(urls, ", "), tostring(m.requests), tostring(m.input_tokens),
                  m.output_known and tostring(m.output_tokens_max) or "?" }
    if not m.output_known then
      notes[#notes + 1] = ("%s: %d of %d requests set max_tokens: no output bound"):format(model, m.with_max_tokens,
        m.requests)
    end
    if rep.priced then
      row[6], row[7] = cost(m.input_cost), cost(m.output_cost_max)
      if not m.price then notes[#notes + 1] = ("%s: no price in %s"):format(model, o.prices) end
    end
    rows[#rows + 1] = row
  end
  local t = rep.totals
  local total = { "total", "", tostring(rep.requests), tostring(t.input_tokens),
                  t.output_tokens_max and tostring(t.output_tokens_max) or "?" }
  if rep.priced then total[6], total[7] = cost(t.input_cost), cost(t.output_cost_max) end
  rows[#rows + 1] = total
  local width = {}
  for _, row in ipairs(rows) do
    for i, cell in ipairs(row) do width[i] = math.max(width[i] or 0, #cell) end
  end
  local lines = {}
  for _, row in ipairs(rows) do
    local cells = {}
    for i, cell in ipairs(row) do
      cells[i] = i <= 2 and ("%-" .. width[i] .. "s"):format(cell) or ("%" .. width[i] .. "s"):format(cell)
    end
    lines[#lines + 1] = (table.concat(cells, "  "):gsub("%s+$", ""))
  end
  if rep.skipped > 0 then
    notes[#notes + 1] = ("%d line(s) are not requests and were skipped (lbatch validate names them)")
      :format(rep.skipped)
  end
  notes[#notes + 1] = "~ " .. rep.method
  if rep.priced then
    notes[#notes + 1] = ("costs are at batch prices (%g x the real-time prices of %s), in its currency units")
      :format(rep.discount, o.prices)
  else
    notes[#notes + 1] = "no prices given (--prices FILE): counts and tokens only"
  end
  for _, note in ipairs(notes) do lines[#lines + 1] = note end
  out(o, rep, table.concat(lines, "\n"))
  return 0
end

-- --header (true), --no-header (false) or neither (nil: recognised);
-- nil, err for both
local function header_flag(o)
  if o.header and o.no_header then return nil, usage_error("--header and --no-header exclude each other") end
  if o.header then return true end
  if o.no_header then return false end
end

-- one line saying that the first row of a CSV was skipped as a header (on
-- stderr with --json, whose stdout is the JSON)
local function said_header(o, path, cells, forced)
  local t = {}
  for i, v in ipairs(cells) do t[i] = csv.quote(v) end
  local line = forced and ("%s: the first row was skipped as a header (--header): %s")
    or ("%s: the first row was taken as a header and skipped: %s (--no-header sends it)")
  local f = o.json and io.stderr or io.stdout
  f:write(line:format(path, table.concat(t, ",")), "\n")
end

function command.csv2jsonl(o, pos)
  if not o.model then return nil, usage_error("--model is required") end
  local n, nerr = nums(o, "max_lines")
  if not n then return nil, nerr end
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local header, herr = header_flag(o)
  if herr then return nil, herr end
  local m, err = csv.to_jsonl(pos[1], { path = pos[2], model = o.model, system = o.system,
                                        endpoint = o.endpoint, max_lines = n.max_lines, limits = limits,
                                        header = header })
  if not m then return nil, err end
  if m.skipped_header then said_header(o, pos[1], m.header, header == true) end
  local t = {}
  for _, f in ipairs(m.files) do
    t[#t + 1] = ("%s  %d lines  %d bytes  %s"):format(f.path, f.lines, f.bytes, f.model)
  end
  out(o, m, table.concat(t, "\n"))
  return 0
end

-- the merged results as JSONL lines on fh (strings made valid UTF-8); the
-- count and the records repaired, or nil, err
local function results_lines(reader, fh, path)
  local n, repaired = 0, 0
  for rec, err in reader:each() do
    if not rec then return nil, err end
    n = n + 1
    local line, changed = results.sanitize({ custom_id = rec.custom_id, ok = rec.ok, status_code = rec.status_code,
      content = rec.content, error_code = rec.error_code, error_message = rec.error_message,
      usage = rec.usage, request_id = rec.request_id, model = rec.model, missing = rec.missing })
    if changed then repaired = repaired + 1 end
    local ok, msg = fh:write(cjson.encode(line), "\n")
    if not ok then return nil, errors.io("cannot write", path, msg) end
  end
  return n, repaired
end

-- the merged results as CSV or JSONL ("-": stdout; a file is written whole
-- or not at all); the count and the records repaired, or nil, err
local function write_results(reader, path, bom)
  if path:find("%.csv$") then return csv.from_results(reader, path, { bom = bom }) end
  if path == "-" then
    local n, repaired = results_lines(reader, io.stdout, "stdout")
    if not n then return nil, repaired end
    local ok, msg = io.stdout:flush()   -- what the buffer held: its write fails here, not at exit
    if not ok then return nil, errors.io("cannot write", "stdout", msg) end
    return n, repaired
  end
  return results.write_whole(path, function(fh) return results_lines(reader, fh, path) end)
end

-- what the command says of records it repaired
local function said_repaired(o, path, repaired)
  if (repaired or 0) > 0 and not o.json then
    io.stderr:write(("lbatch: %s: %d record(s) held invalid UTF-8 or NUL bytes: written repaired (U+FFFD)\n")
      :format(path, repaired))
  end
end

-- ", N invalid answers" (not the JSON their requests asked for), or ""
local function invalid_note(s)
  if (s.invalid_answers or 0) == 0 then return "" end
  return (", %d invalid answer(s)"):format(s.invalid_answers)
end

function command.results(o, pos)
  local r, err = results.open({ output = pos[1], errors = o.errors, inputs = o.inputs })
  if not r then return nil, err end
  local n, repaired
  n, repaired = write_results(r, o.csv or "-", o.bom)
  if not n then return nil, repaired end
  said_repaired(o, o.csv or "stdout", repaired)
  if o.csv and not o.json then
    local s, serr = r:summary()
    if not s then return nil, serr end
    io.stdout:write(("%s: %d ok, %d failed, %d missing%s\n"):format(o.csv, s.ok, s.failed, s.missing, invalid_note(s)))
  end
  return 0
end

-- The command's client. On SIGINT or SIGTERM it is closed at the end of
-- the loop's turn (a download's temp file goes with it; a pipeline's
-- journal is whole) and the command exits 130.
-- `hold(sig)`, when given, may keep it going a while (true: not yet).
local function client(o, hold)
  -- no key: thrown
  local c = errors.try(lbatch.new({ base_url = o.base_url, region = o.region, provider = o.provider,
                                    workspace = o.workspace }))
  if c.config.warning then io.stderr:write("lbatch: ", c.config.warning, "\n") end
  core.trap()
  debug.sethook()             -- (main's raising hook: from now on the client's turn ends stop it)
  c:at_turn_end(function()
    local sig = core.caught()
    if sig and not (hold and hold(sig)) then
      if o.on_interrupt then o.on_interrupt() end   -- (top: the terminal as it was)
      c:close()
      io.stderr:write("\nlbatch: interrupted\n")
      os.exit(128 + sig)
    end
  end)
  return c
end

local recover = require "lbatch.impl.api.recover"

-- what submit is told, checked before anything is read or sent: nil, or a usage error
local function submit_usage(o, limits)
  local p = service.PROFILES[limits]
  if o.window ~= nil then
    local n, unit = tostring(o.window):match("^(%d+)([hd])$")
    local hours = n and tonumber(n) * (unit == "d" and 24 or 1)
    if p.min_window_hours == p.max_window_hours and o.window ~= p.max_window_hours .. "h" then hours = nil end
    if not hours or hours < p.min_window_hours or hours > p.max_window_hours then
      local range = p.min_window_hours == p.max_window_hours and ("only %dh"):format(p.max_window_hours)
        or ("from %dh to %dh"):format(p.min_window_hours, p.max_window_hours)
      return usage_error(("--window %s: a completion window is hours or days (24h, 7d), %s on %s")
        :format(tostring(o.window), range, limits))
    end
  end
  local m, keys = service.METADATA, 0
  for k, v in pairs(o.meta or {}) do
    keys = keys + 1
    if #k > m.max_key or #v > m.max_value or k:find("^lbatch_") then
      return usage_error(("--meta %s: keys are up to %d characters, values up to %d, and lbatch_ keys are lbatch's")
        :format(k, m.max_key, m.max_value))
    end
  end
  if keys > m.max_keys - 1 then
    return usage_error(("--meta: at most %d keys (the service takes %d; lbatch_submit is one)")
      :format(m.max_keys - 1, m.max_keys))
  end
end

-- the file's checks, as validate's: its report, or nil and an error (nothing sent)
local function submit_check(o, path, limits)
  if path:lower():find("%.csv$") then
    return nil, errors.new({ kind = "invalid", code = "not_jsonl", message = path .. " is a CSV, not request "
      .. "lines: lbatch run takes it (or csv2jsonl makes request files of it); nothing was uploaded" })
  end
  local rep, err = jsonl.validate(path, { endpoint = o.endpoint, limits = limits, region = o.region })
  if not rep then return nil, err end
  for _, w in ipairs(rep.warnings) do
    io.stderr:write(("%s:%s: warning: %s %s\n"):format(path, w.line or "-", w.code, w.message))
  end
  for i, p in ipairs(rep.problems) do
    if i > 10 then io.stderr:write(("%s: ... and %d more\n"):format(path, #rep.problems - 10)) break end
    io.stderr:write(("%s:%s: %s %s\n"):format(path, p.line or "-", p.code, p.message))
  end
  if #rep.problems > 0 then
    return nil, errors.new({ kind = "invalid", code = "invalid_file", message = ("%s: %d problem(s) against %s, "
      .. "the first: %s; nothing was uploaded (lbatch validate names them; --no-check sends it anyway)")
      :format(path, #rep.problems, limits, rep.problems[1].code) })
  end
  return rep
end

-- the url of the file's first line (the endpoint when --no-check and no --endpoint)
local function first_url(path)
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  local line = fh:read("*l")
  fh:close()
  local ok, v = pcall(cjson.decode, line or "")
  if ok and type(v) == "table" and type(v.url) == "string" then return v.url end
  return nil, usage_error(path .. ": its first line names no url: say --endpoint")
end

local hex = core.hex

-- the stamp of a submit: a hash of the file's bytes and of what shapes its batch
local function submit_stamp(path, endpoint, window, meta)
  local keys = {}
  for k in pairs(meta or {}) do keys[#keys + 1] = k end
  table.sort(keys)
  local parts = { endpoint, window or "" }
  for _, k in ipairs(keys) do parts[#parts + 1] = k .. "=" .. meta[k] end
  local h = core.hmac_sha256("lbatch submit", table.concat(parts, "\0"))
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  for chunk in function() return fh:read(1048576) end do h = core.hmac_sha256(h, chunk) end
  fh:close()
  return hex(h):sub(1, 16)
end

local function when(t) return t and os.date("!%Y-%m-%d %H:%M UTC", t) or "at an unknown time" end

local SUBMIT_GRACE = 15     -- seconds a Ctrl-C during the create waits for the service's answer

-- what an earlier submit of the same stamp left: its file (by its name and
-- size) and its batch, each or both nil; or nil, nil and an error
local function submitted(c, path, name, stamp)
  local f, err = recover.upload(function(q) return c:list_files(q) end,
    { filename = name, bytes = require("lbatch.impl.formats.size").file(path) })
  if err then return nil, nil, err end
  local b
  b, err = recover.stamped(function(q) return c:list_batches(q) end,
    { input_file_id = f and f.id, key = "lbatch_submit", stamp = stamp })
  if err then return nil, nil, err end
  return f, b
end

local function upload_shown(c, path, name)
  local show, finish = transfer_printer("upload " .. path)
  local f, err = c:upload(path, { filename = name }, { on_progress = show })
  finish()
  return f, err
end

function command.submit(o, pos)
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local uerr = submit_usage(o, limits)
  if uerr then return nil, uerr end
  local path, endpoint, err = pos[1], o.endpoint, nil
  if not o.no_check then
    local rep
    rep, err = submit_check(o, path, limits)
    if not rep then return nil, err end
    endpoint = endpoint or rep.endpoint
  end
  if not endpoint then endpoint, err = first_url(path) end
  if not endpoint then return nil, err end
  local stamp
  stamp, err = submit_stamp(path, endpoint, o.window, o.meta)
  if not stamp then return nil, err end
  local creating, held = false, nil
  local c = client(o, function()
    if not creating then return false end
    held = held or now()
    if now() - held < SUBMIT_GRACE then return true end
    io.stderr:write("\nlbatch: the create had no answer; its batch may exist: the same submit finds it\n")
  end)
  local name = (path:match("[^/]*$"):gsub("%.jsonl$", "")) .. "-" .. stamp .. ".jsonl"
  local f, b
  if not o.again then
    f, b, err = submitted(c, path, name, stamp)
    if err then return nil, err end
    if b then
      io.stderr:write(("already submitted: %s (created %s, %s); --again makes a new one\n"):format(b.id,
        when(b.created_at), tostring(b.status)))
      out(o, b, batch_line(b))
      return 0
    end
  end
  if not f then f, err = upload_shown(c, path, name) end
  if not f then return nil, err end
  local meta = {}
  for k, v in pairs(o.meta or {}) do meta[k] = v end
  meta.lbatch_submit = o.again and (stamp .. "." .. hex(core.hmac_sha256(stamp, tostring(now())
    .. tostring({}))):sub(1, 8)) or stamp
  creating = true
  b, err = c:create({ input_file_id = f.id, endpoint = endpoint, completion_window = o.window, metadata = meta })
  creating = false
  if not b then return nil, err end
  out(o, b, batch_line(b))
  local sig = core.caught()
  if sig then
    io.stderr:write(("\nlbatch: interrupted; the batch %s was made\n"):format(b.id))
    return 128 + sig
  end
  return 0
end

function command.status(o, pos)
  local n, nerr = nums(o, "poll")
  if not n then return nil, nerr end
  local c = client(o)
  local b, err
  if o.wait then
    local show, done = progress_printer()
    local started = os.time()
    b, err = c:wait(pos[1], { interval = n.poll, on_progress = function(x)
      local cnt = x.request_counts or {}
      show({ jobs = { [x.status] = 1 }, total = cnt.total or 0, completed = cnt.completed or 0,
             failed = cnt.failed or 0, elapsed = os.time() - started })
    end })
    done()
  else
    b, err = c:retrieve(pos[1])
  end
  if not b then return nil, err end
  out(o, b, o.json and "" or batch_text(c, b))
  return service.FINAL_BAD[b.status] and 3 or 0
end

function command.list(o)
  local n, nerr = nums(o, "limit")
  if not n then return nil, nerr end
  local c = client(o)
  local params = { limit = n.limit or 20, status = o.status }
  local all, lines, more = {}, {}, false
  if o.all then
    for b, err in c:each_batch(params) do
      if not b then return nil, err end
      all[#all + 1] = b
    end
  else
    local p, err = c:list_batches(params)
    if not p then return nil, err end
    all, more = p.data, p.has_more == true
  end
  for i, b in ipairs(all) do lines[i] = batch_line(b) end
  lines[#lines + 1] = ("%d batch(es)%s"):format(#all, more and "; more with --all or a larger --limit" or "")
  out(o, all, table.concat(lines, "\n"))
  return 0
end

function command.cancel(o, pos)
  local b, err = client(o):cancel(pos[1])
  if not b then return nil, err end
  out(o, b, batch_line(b))
  return 0
end

-- a temporary file's bytes to stdout, and the file removed: "-", or nil and an error
local function to_stdout(tmp)
  local f, msg = io.open(tmp, "rb")
  if not f then return nil, errors.io("cannot read", tmp, msg) end
  local ok, werr = true, nil
  for chunk in function() return f:read(65536) end do
    ok, werr = io.stdout:write(chunk)
    if not ok then break end
  end
  f:close()
  if ok then ok, werr = io.stdout:flush() end
  if not ok then return nil, errors.io("cannot write", "stdout", werr) end
  return "-"
end

-- a file's content to path ("-": stdout, through a temporary file, so
-- that nothing of a cut download is written), with progress
local function fetch(c, id, path)
  local target = path == "-" and os.tmpname() or path
  local show, finish = transfer_printer("download " .. (path == "-" and "to stdout" or path))
  local got, err = c:content(id, { path = target, on_progress = show })
  finish()
  if got and path == "-" then got, err = to_stdout(target) end
  if path == "-" then os.remove(target) end
  return got, err
end

-- a batch with no file: still running (0), or final and why (3)
local function nothing_to_download(o, b)
  local c = b.request_counts or {}
  if not service.FINAL[b.status] then
    out(o, { batch = b.id, status = b.status }, ("nothing to download yet: %s is %s (%d/%d done)")
      :format(b.id, b.status, c.completed or 0, c.total or 0))
    return 0
  end
  local t = { ("nothing to download: %s ended %s with no output or error file"):format(b.id, b.status) }
  for _, l in ipairs(error_lines(b)) do t[#t + 1] = l end
  out(o, { batch = b.id, status = b.status, errors = b.errors }, table.concat(t, "\n"))
  return 3
end

function command.download(o, pos)
  local c = client(o)
  local id = pos[1]
  local got, err, b = {}
  if id:find("^batch") then
    b, err = c:retrieve(id)
    if not b then return nil, err end
    if b.output_file_id then
      got.output, err = fetch(c, b.output_file_id, o.output or (id .. ".output.jsonl"))
      if not got.output then return nil, err end
    end
    if b.error_file_id then
      got.errors, err = fetch(c, b.error_file_id, o.errors or (id .. ".errors.jsonl"))
      if not got.errors then return nil, err end
    end
  else
    got.output, err = fetch(c, id, o.output or (id .. ".jsonl"))
    if not got.output then return nil, err end
  end
  if not next(got) and b then return nothing_to_download(o, b) end
  local t = {}
  for k, v in pairs(got) do t[#t + 1] = k .. "  " .. v end
  table.sort(t)
  local say = (got.output == "-" or got.errors == "-") and { json = o.json, stdout = io.stderr } or o
  out(say, got, #t > 0 and table.concat(t, "\n") or "nothing to download yet")
  return 0
end

-- the id of the run in DIR (its journal's first record), or nil
local function run_id_in(dir)
  local fh = io.open(dir .. "/journal.jsonl", "rb")
  local line = fh and fh:read("*l")
  if fh then fh:close() end
  local ok, rec = pcall(cjson.decode, line or "")
  return ok and type(rec) == "table" and type(rec.run) == "string" and rec.run or nil
end

-- says the run's id on stderr once: at once when DIR has a journal, else
-- at its first step (before anything is sent); returns the on_step
local function run_id_teller(dir)
  local said = false
  local function say(id)
    if said or not id then return end
    said = true
    io.stderr:write(("lbatch: run %s in %s (lbatch adopt --run %s rebuilds a lost journal)\n"):format(id, dir, id))
  end
  say(run_id_in(dir))
  return function(_, s) say(type(s) == "table" and type(s.name) == "string" and s.name:match("^(.-)%-%d+%.jsonl$")) end
end

-- What a run on a DIR that held a run before did with it: on stderr (the
-- counts also on stdout, so that a user reading the summary sees them).
local function said_rerun(o, dir, report)
  local ch = report.change or {}
  if not ch.rerun then return end
  local say = function(text) io.stderr:write("lbatch run: ", text, "\n") end
  if ch.fingerprint == "unknown" then
    say(dir .. "'s journal does not say what its run was asked (an older lbatch wrote it): the input and "
      .. "options were not checked against it, its run goes on as it was (--fresh starts a new run)")
  end
  if ch.fresh then say(("a new run in %s; the old run's journal is kept as %s"):format(dir, ch.archived)) end
  if ch.unfinished then
    say("the old run had not finished: its batches still in flight were not cancelled (lbatch list)")
  end
  for _, d in ipairs(ch.shaping or {}) do say(d .. " (--reuse)") end
  for _, d in ipairs(ch.notes) do
    say(d .. " (how requests are grouped into batches, not what they ask: their answers stay)")
  end
  if (ch.changed or 0) + (ch.added or 0) + (ch.dropped or 0) > 0 then
    say(("the input changed: %d new, %d changed (sent again), %d no longer asked (dropped from the results)")
      :format(ch.added, ch.changed, ch.dropped))
  end
  if not o.json and report.requests then
    io.stdout:write(("%d requests: %d answered before, %d sent now\n")
      :format(report.requests, report.reused, report.sent))
  end
end

-- --canary N, --canary-check FILE.lua, --canary-min-ok X as pipeline.run's
-- canary (nil without --canary), or nil and a usage error
local function canary_of(o, n)
  if not n.canary then
    if o.canary_check or o.canary_min_ok then
      return nil, usage_error("--canary-check and --canary-min-ok need --canary N")
    end
    return nil
  end
  if n.canary < 1 or n.canary ~= math.floor(n.canary) then
    return nil, usage_error("--canary takes a whole number, 1 or more")
  end
  if n.canary_min_ok and n.canary_min_ok > 1 then
    return nil, usage_error("--canary-min-ok takes a share, from 0 to 1")
  end
  local check
  if o.canary_check then
    local chunk, why = loadfile(o.canary_check)
    local ok, fn = chunk ~= nil, why
    if chunk then ok, fn = pcall(chunk) end
    if not ok or type(fn) ~= "function" then
      return nil, usage_error(("--canary-check %s must be a Lua file that returns a function: %s"):format(
        o.canary_check, ok and ("it returned a " .. type(fn)) or tostring(fn)))
    end
    check = fn
  end
  return { lines = math.floor(n.canary), check = check, min_ok = n.canary_min_ok }
end

local function percent(x) return ("%d%%"):format(math.floor((x or 0) * 100 + 0.5)) end

-- the canary's one line: "canary: 20 of 20 requests, 19 passed (95%), min
-- 95%: released 980" (answered of sent, passed, the share, min_ok, then what followed)
local function canary_line(c)
  if c.adopted and c.state == "passed" and not c.requests then
    return ("canary: passed before its journal was lost (adopted; not judged again): released %d"):format(c.rest or 0)
  end
  local head = ("canary: %d of %d requests, %d passed (%s), min %s: "):format(c.answered or 0,
    c.requests or c.lines or 0, c.passed or 0, percent(c.share), percent(c.min_ok))
  if c.state == "passed" then return head .. ("released %d"):format(c.rest or 0) end
  return head .. ("stopped: %d held, nothing more sent"):format(c.rest or 0)
end

-- the canary in --json: its verdict, without the failures' list when it passed
local function canary_json(c)
  if not c then return nil end
  return { state = c.state, requests = c.requests, answered = c.answered, passed = c.passed, share = c.share,
           min_ok = c.min_ok, released = c.state == "passed" and (c.rest or 0) or 0, held = c.rest,
           failures = json.array(c.failures or {}), line = canary_line(c) }
end

-- When the batches' usage (what the service bills: the summary's tokens)
-- and the result lines' sum disagree, one line on stderr saying both; the
-- lines' sum for --json ({prompt_tokens, completion_tokens, total_tokens}),
-- or nil when they agree or the lines' sum is all there is
local function usage_differs(s)
  local l = s.usage_source == "batch" and s.usage_differs and s.lines_usage
  if not l then return nil end
  io.stderr:write(("lbatch run: the batches' usage, what the service bills and the tokens above, is %d in, "
    .. "%d out; the result lines sum to %d in, %d out\n"):format(s.prompt_tokens, s.completion_tokens,
    l.prompt_tokens, l.completion_tokens))
  return { prompt_tokens = l.prompt_tokens, completion_tokens = l.completion_tokens, total_tokens = l.total_tokens }
end

-- run's closing summary (on stdout, and the usage line on stderr): the
-- exit code, or nil and an error
local function said_summary(o, dir, output, report, repaired)
  local s, err = report.results:summary({ batches = report.shards })   -- the batches' usage when they have it
  if not s then return nil, err end
  local bad = 0
  for _, sh in ipairs(report.shards) do if service.FINAL_BAD[sh.status] then bad = bad + 1 end end
  local lines_usage = usage_differs(s)
  out(o, { output = output, shards = #report.shards, total = s.total, ok = s.ok, failed = s.failed,
           missing = s.missing, total_tokens = s.total_tokens, reused = report.reused, sent = report.sent,
           repaired = repaired, canary = canary_json(report.canary), invalid_answers = s.invalid_answers,
           prompt_tokens = s.prompt_tokens, completion_tokens = s.completion_tokens, usage_source = s.usage_source,
           usage_differs = s.usage_differs or false, lines_usage = lines_usage, unanswered = report.unanswered,
           last_error = report.last_error and tostring(report.last_error) or nil },
    ("%s: %d requests, %d ok, %d failed, %d missing%s, %d tokens, " .. (report.via == "batch_chat"
      and ("through Batch Chat (%d answered before, %d sent now)"):format(report.reused, report.sent)
      or ("%d shard(s); run " .. tostring(run_id_in(dir))):format(#report.shards))):format(
      output, s.total, s.ok, s.failed, s.missing, invalid_note(s), s.total_tokens))
  if report.via == "batch_chat" and (report.unanswered or 0) > 0 then
    io.stderr:write(("lbatch run: %d request(s) got no answer through Batch Chat (the last error: %s); the same "
      .. "command again sends them, and only them\n"):format(report.unanswered, tostring(report.last_error)))
  end
  return (bad > 0 or s.missing > 0) and 3 or 0
end

function command.run(o, pos)
  if pos[1]:lower():find("%.csv$") and not o.model then return nil, usage_error("--model is required for a CSV") end
  local n, nerr = nums(o, "max_in_flight", "max_lines", "poll", "max_cost", "wait_lock", "canary", "canary_min_ok",
    "recover_window")
  if not n then return nil, nerr end
  local canary, canerr = canary_of(o, n)
  if canerr then return nil, canerr end
  if n.max_cost and not o.prices then return nil, usage_error("--max-cost needs --prices FILE") end
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local header, herr = header_flag(o)
  if herr then return nil, herr end
  if pos[1]:find("%.csv$") then
    local cells = csv.header_of(pos[1], header)   -- as the pipeline reads it; a file it cannot read fails there
    if cells then said_header(o, pos[1], cells, header == true) end
  end
  local notify
  if o.notify_url and not o.notify_listen then
    return nil, usage_error("--notify-url needs --notify-listen HOST:PORT (where the notices arrive)")
  end
  if o.notify_listen then
    local secrets = {}
    for s in (os.getenv("OPENAI_WEBHOOK_SECRET") or ""):gmatch("%S+") do secrets[#secrets + 1] = s end
    for i, s in ipairs(secrets) do
      if not require("lbatch.notify").key(s) then
        return nil, usage_error(("$OPENAI_WEBHOOK_SECRET: secret %d is not whsec_<base64>"):format(i))
      end
    end
    notify = { url = o.notify_url, listen = o.notify_listen, secrets = secrets,
      on_listen = function(host, port)
        io.stderr:write(("lbatch: told, not polling: listening for notices on %s:%s\n"):format(host, port))
      end }
  end
  if o.fresh and o.reuse then return nil, usage_error("--fresh or --reuse, not both") end
  -- --via batch-chat: lbatch.impl.orchestration.batchchat
  local via = o.via and ({ ["batch-chat"] = "batch_chat", file = "file" })[o.via]
  if o.via and not via then return nil, usage_error("--via takes batch-chat or file") end
  local bn, bnerr = nums(o, "concurrency", "batch_chat_wait")
  if not bn then return nil, bnerr end
  local c = client(o)
  local dir = o.dir or (pos[1] .. ".lbatch")
  local missing = unreadable(pos[1], dir)
  if missing then return nil, missing end
  local fresh = not os.rename(dir, dir)
  local show, done, moving = progress_printer()
  local report, err = pipeline.run({
    client = c, requests = pos[1], dir = dir, model = o.model, system = o.system, endpoint = o.endpoint,
    max_in_flight = n.max_in_flight, max_lines = n.max_lines, limits = limits,
    completion_window = o.window, metadata = o.meta, poll_interval = n.poll,
    resubmit = o.resubmit, on_progress = show, on_transfer = moving, max_cost = n.max_cost, prices = o.prices,
    header = header, notify = notify, on_step = run_id_teller(dir), wait_lock = n.wait_lock,
    recover_window = n.recover_window,
    on_change = o.fresh and "fresh" or o.reuse and "reuse" or nil, canary = canary,
    via = via, batch_chat_url = o.batch_chat_url, concurrency = bn.concurrency, wait = bn.batch_chat_wait,
  })
  done()
  local judged = report and report.canary or err and err.canary
  if judged and judged.state then io.stderr:write("lbatch run: ", canary_line(judged), "\n") end
  if not report then
    if fresh and err.kind ~= "busy" then unstarted(dir) end
    return nil, err
  end
  said_rerun(o, dir, report)
  local output = o.output or (dir .. "/results.jsonl")
  local written, repaired = write_results(report.results, output, o.bom)
  if not written then return nil, repaired end
  said_repaired(o, output, repaired)
  return said_summary(o, dir, output, report, repaired)
end

function command.flow(o, pos)
  if not o.items then return nil, usage_error("--items FILE is required") end
  local n, nerr = nums(o, "max_in_flight", "max_lines", "poll", "max_cost", "finish_realtime", "wait_lock",
    "recover_window")
  if not n then return nil, nerr end
  if n.max_cost and not o.prices then return nil, usage_error("--max-cost needs --prices FILE") end
  local flush
  if o.flush then
    local fl, fs = tostring(o.flush):match("^([%d]*),([%d.]*)$")
    flush = fl and { lines = tonumber(fl), seconds = tonumber(fs) }
    if not flush or not (flush.lines or flush.seconds) then
      return nil, usage_error("--flush takes LINES,SECONDS (either may be empty: 100, or ,30)")
    end
  end
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local chunk, why = loadfile(pos[1])
  if not chunk then return nil, errors.new({ kind = "invalid", code = "bad_script", message = why }) end
  local script = chunk()
  if type(script) ~= "table" or type(script.step) ~= "function" then
    return nil, errors.new({ kind = "invalid", code = "bad_script",
      message = pos[1] .. " must return a table with a step function (lbatch.flow)" })
  end
  local dir = o.dir or (o.items .. ".flow")
  local missing = unreadable(o.items, dir)
  if missing then return nil, missing end
  local quiet = o.json
  local report, err = require("lbatch.flow").run({
    client = client(o), dir = dir, items = o.items, step = script.step, key = script.key,
    model = o.model or script.model, limits = limits, max_lines = n.max_lines, max_in_flight = n.max_in_flight,
    poll_interval = n.poll, on_change = o.ask_again and "ask_again" or script.on_change,
    max_cost = n.max_cost, prices = o.prices, finish_realtime = n.finish_realtime, flush = flush,
    wait_lock = n.wait_lock, recover_window = n.recover_window,
    on_progress = function(p)
      if quiet or p.batches then return end
      io.stderr:write(("round %d: %d of %d items done, %d failed, %d tokens\n"):format(p.round, p.done, p.items,
        p.failed, p.tokens))
    end,
  })
  if not report then return nil, err end
  local output = o.output or (dir .. "/results.jsonl")
  if output ~= dir .. "/results.jsonl" then
    local written, werr = results.write_whole(output, function(fh)
      for r in report.results:each() do
        local ok, msg = fh:write(json.encode(r), "\n")
        if not ok then return nil, errors.io("cannot write", output, msg) end
      end
      return true
    end)
    if not written then return nil, werr end
  end
  said_repaired(o, output, report.repaired)
  out(o, { output = output, items = report.items, done = report.done, failed = report.failed, asks = report.asks,
           rounds = #report.rounds, batches = report.batches, realtime = report.realtime, tokens = report.tokens,
           repaired = report.repaired },
    ("%s: %d items, %d done, %d failed; %d asks in %d rounds, %d batches, %d real-time, %d tokens"):format(output,
      report.items, report.done, report.failed, report.asks, #report.rounds, report.batches, report.realtime,
      report.tokens))
  return 0
end

function command.adopt(o, pos)
  if pos[1]:lower():find("%.csv$") and not o.model then return nil, usage_error("--model is required for a CSV") end
  if not o.run then return nil, usage_error("--run RUN is required") end
  local n, nerr = nums(o, "max_lines", "wait_lock", "canary", "canary_min_ok")
  if not n then return nil, nerr end
  local canary, canerr = canary_of(o, n)
  if canerr then return nil, canerr end
  local limits, lerr = limits_of(o)
  if not limits then return nil, lerr end
  local header, herr = header_flag(o)
  if herr then return nil, herr end
  local dir = o.dir or (pos[1] .. ".lbatch")
  local found, err = pipeline.adopt({ client = client(o), requests = pos[1], dir = dir, run = o.run,
    model = o.model, system = o.system, endpoint = o.endpoint, max_lines = n.max_lines, limits = limits,
    header = header, completion_window = o.window, wait_lock = n.wait_lock, canary = canary })
  if not found then
    err.message = err.message:gsub("give adopt the options the run had: [^)]*", "give adopt the options the run "
      .. "had: --max-lines, --model, --system, --header or --no-header, --endpoint, --limits, --window, --canary")
      :gsub("%(canary = {lines = %d+}, ", "(")
    return nil, err
  end
  local judged = found.canary and (found.canary == "passed" and "; its canary had passed"
    or "; its canary is judged by the next run (give it --canary-check if the run had one)") or ""
  out(o, found, ("%s: run %s, %d shard(s): %d file(s) and %d batch(es) found%s%s; lbatch run resumes it")
    :format(dir, found.run, found.shards, found.files, found.batches, found.max_lines
      and ("; its shards hold %d lines, as --max-lines %d made them"):format(found.max_lines, found.max_lines) or "",
      judged))
  return 0
end

-- ------------------------------------------------------------ files

local function age(seconds) return require("lbatch.impl.formats.size").duration(seconds, "coarse") end

local function file_line(f)
  return ("%s  %-14s %10s  %5s  %s"):format(f.id, tostring(f.purpose), fmt_bytes(f.bytes or 0),
    age(os.time() - (f.created_at or os.time())), tostring(f.filename))
end

-- every file the options select: a list, or nil and an error
local function select_files(c, o, limit, keep)
  local all = {}
  local params = { limit = limit, purpose = o.purpose ~= "all" and o.purpose or nil }
  if o.all or keep then
    for f, err in c:each_file(params) do
      if not f then return nil, err end
      if not keep or keep(f) then all[#all + 1] = f end
    end
  else
    local p, err = c:list_files(params)
    if not p then return nil, err end
    all = p.data
  end
  -- newest first, keeping the service's order among equals
  local pos = {}
  for i, f in ipairs(all) do pos[f] = i end
  table.sort(all, function(a, b)
    local ta, tb = a.created_at or 0, b.created_at or 0
    if ta ~= tb then return ta > tb end
    return pos[a] < pos[b]
  end)
  return all
end

function command.files(o)
  local n, nerr = nums(o, "limit")
  if not n then return nil, nerr end
  local list, err = select_files(client(o), o, n.limit or 100)
  if not list then return nil, err end
  local lines, bytes = {}, 0
  for i, f in ipairs(list) do lines[i], bytes = file_line(f), bytes + (f.bytes or 0) end
  lines[#lines + 1] = ("%d file(s), %s"):format(#list, fmt_bytes(bytes))
  out(o, list, table.concat(lines, "\n"))
  return 0
end

function command.rm(o, pos)
  local c, done, failed = client(o), {}, nil
  for _, id in ipairs(pos) do
    local r, err = c:delete_file(id)
    if r then done[#done + 1] = id
    else
      failed = failed or err
      io.stderr:write("lbatch rm: ", (tostring(err):gsub("^lbatch: ", "")), "\n")
    end
  end
  out(o, { deleted = done }, #done > 0 and ("deleted " .. table.concat(done, " ")) or "nothing deleted")
  return failed and 1 or 0
end

local UNITS = { s = 1, m = 60, h = 3600, d = 86400, w = 7 * 86400 }

local function parse_age(s)
  local n, u = tostring(s or ""):match("^(%d+%.?%d*)([smhdw])$")
  if not n then return nil end
  return tonumber(n) * UNITS[u]
end

local BATCH_PURPOSES = { batch = true, batch_output = true }

function command.prune(o)
  local older = parse_age(o.older_than)
  if not older then return nil, usage_error("--older-than takes an age such as 30d, 12h or 2w") end
  local cutoff = os.time() - older
  local c = client(o)
  local list, err = select_files(c, o, 100, function(f)
    local purpose_ok = o.purpose == "all" or (o.purpose and f.purpose == o.purpose)
      or (not o.purpose and BATCH_PURPOSES[f.purpose])
    return purpose_ok and (f.created_at or math.huge) < cutoff
  end)
  if not list then return nil, err end
  local lines, freed, deleted, failed = {}, 0, {}, nil
  for _, f in ipairs(list) do
    if o.dry_run then
      lines[#lines + 1] = "would delete " .. file_line(f)
      freed, deleted[#deleted + 1] = freed + (f.bytes or 0), f.id
    else
      local r, derr = c:delete_file(f.id)
      if r then
        lines[#lines + 1] = "deleted " .. file_line(f)
        freed, deleted[#deleted + 1] = freed + (f.bytes or 0), f.id
      else
        failed = failed or derr
        io.stderr:write("lbatch prune: ", (tostring(derr):gsub("^lbatch: ", "")), "\n")
      end
    end
  end
  lines[#lines + 1] = ("%s %d file(s), %s"):format(o.dry_run and "would free" or "freed", #deleted, fmt_bytes(freed))
  out(o, { deleted = deleted, bytes = freed, dry_run = o.dry_run or false }, table.concat(lines, "\n"))
  return failed and 1 or 0
end

-- ------------------------------------------------------------ main

-- --prices FILE: the prices table (nil without the option), or nil and an error
local function prices_of(o)
  if not o.prices then return false end
  local prices, err = require("lbatch.impl.formats.estimate").prices(o.prices)
  if prices == nil then return nil, err end
  return prices
end

function command.top(o)
  local n, nerr = nums(o, "interval")
  if not n then return nil, nerr end
  local prices, perr = prices_of(o)
  if prices == nil then return nil, perr end
  if o.dir then
    local fh = io.open(o.dir .. "/journal.jsonl", "rb")
    if not fh then return nil, usage_error("--dir " .. o.dir .. ": no journal.jsonl there (a pipeline's --dir)") end
    fh:close()
  end
  local topts = { status = o.status, interval = n.interval, dir = o.dir, prices = prices or nil }
  o.on_interrupt = function() if topts.restore then topts.restore() end end
  return require("lbatch.cmd.top").run(client(o), topts)
end

function command.report(o, pos)
  local prices, perr = prices_of(o)
  if prices == nil then return nil, perr end
  prices = prices or nil
  local output = o.output or (pos[1] .. "/report.html")
  local st, err = require("lbatch.cmd.report").write(pos[1], output, { prices = prices })
  if not st then return nil, err end
  local sm = st.summary or {}
  out(o, { output = output, summary = st.summary }, ("%s: %d requests, %d ok, %d failed"):format(output,
    sm.total or 0, sm.ok or 0, sm.failed or 0))
  return 0
end

-- the exit codes of errors other than 1 (a failure) by their kind (2, wrong
-- usage, is the code "usage"; 3, a batch that ended badly, a command's own)
local EXIT_OF_KIND = { canary = 4 }

--- Run the command.
-- @tparam {string,...} args the arguments (`arg`)
-- @treturn integer the exit code
function M.main(args)
  local name = args[1]
  if name == "--version" or name == "-V" then
    io.stdout:write("lbatch ", lbatch.VERSION, "\n")
    return 0
  end
  if not name or name == "-h" or name == "--help" or name == "help" then
    io.stdout:write(usage(), "\n")
    return name and 0 or 2
  end
  local cmd = COMMANDS[name]
  if not cmd then
    io.stderr:write("lbatch: unknown command ", name, "\n\n", usage(), "\n")
    return 2
  end
  local rest = {}
  for i = 2, #args do rest[#rest + 1] = args[i] end
  local o, pos = parse(rest, options_of(cmd))
  if not o then
    io.stderr:write(("lbatch %s: %s (see lbatch %s --help)\n"):format(name, pos, name))
    return 2
  end
  if o.help then
    io.stdout:write(("Usage: lbatch %s %s [options]\n\n%s\n\n%s\n"):format(name, cmd.args, cmd.help, GLOBAL))
    return 0
  end
  local want = select(2, cmd.args:gsub("%S+", ""))
  local many = cmd.args:find("%.%.%.$")
  if (many and #pos < want) or (not many and #pos ~= want) then
    io.stderr:write(("lbatch %s: expected %s (see lbatch %s --help)\n"):format(name,
      want == 0 and "no arguments" or cmd.args, name))
    return 2
  end
  -- SIGINT and SIGTERM set a flag (core.trap), not the interpreter's
  -- handler, whose "interrupted!" any pcall on its way swallows (a line
  -- decoded in a pcall: a Ctrl-C in validate was lost, and it went on). Until
  -- a client is made (its turn ends stop it cleanly), a hook raises it in Lua
  -- code every 10,000 instructions; on its way out, every command looks.
  core.trap()
  debug.sethook(function() if core.caught() then error("interrupted!", 0) end end, "", 10000)
  local ok, code, err = pcall(command[name], o, pos)
  debug.sethook()
  local sig = core.caught()
  -- (or the interpreter's SIGINT, before the trap: "interrupted!" where Lua
  -- code ran, as such or inside an error a reader made of it)
  local said = not ok and (errors.thrown(code) or code) or err
  said = type(said) == "table" and said.message or said
  if sig or (type(said) == "string" and said:find("interrupted!$")) then
    io.stderr:write("\nlbatch: interrupted\n")
    return 128 + (sig or 2)
  end
  if not ok and errors.thrown(code) then   -- a failure thrown by errors.try
    err = errors.thrown(code)
  elseif not ok then   -- a bug, or an option of the wrong value (lbatch.new raises; on plain Lua 5.1, always)
    local unsupported = require("lbatch.impl.transport.loop").UNSUPPORTED
    err = errors.new({ kind = unsupported and tostring(code):find(unsupported, 1, true) and "config" or "invalid",
                       message = (tostring(code):gsub("^[^\n]-:%d+: ", "")) })
  elseif code then
    local flushed, msg = io.stdout:flush()   -- a full disk or a closed pipe: not a silent success
    if code ~= 0 or flushed then return code end
    err = errors.io("cannot write", "stdout", msg)
  end
  if err.code == "usage" then
    io.stderr:write("lbatch ", name, ": ", err.message, "\n")
    return 2
  end
  if o.json then
    io.stdout:write(cjson.encode({ error = { kind = err.kind, status = err.status, code = err.code,
      message = err.message, param = err.param, request_id = err.request_id, canary = canary_json(err.canary) } }),
      "\n")
  end
  io.stderr:write("lbatch ", name, ": ", (tostring(err):gsub("^lbatch: ", "")), "\n")
  return EXIT_OF_KIND[err.kind] or 1
end

return M
