--- DashScope Batch Chat: a file batch's request lines, each sent as one held
-- call (`POST {batch_chat_url}/chat/completions`, the chat body as it is),
-- at once on the client's multi handle (HTTP/2 streams), at most
-- `concurrency` in flight.
--
-- Each answer is appended to the results file the moment it comes (a write
-- and a flush: a kill -9 of this process loses nothing appended), and that
-- file is synced to the disk every `sync_lines` answers or `sync_seconds`
-- (what a crash of the machine, not of the process, may lose). Its lines
-- have a file batch's output format (`{id, custom_id, response =
-- {status_code, request_id, body}, error}`), so `lbatch.results` reads them
-- and `summary` counts them as it counts a batch's. Run again on the same
-- file, only the custom_ids without an answer in it are sent. The one thing
-- that can be paid twice: an answer the service sent that the process did
-- not live to append (killed between the answer's last byte and its write,
-- a few microseconds per answer), or a retried call whose first answer was
-- lost on the network.
--
-- Retries: the client's policy (`lbatch.impl.transport.http`: the
-- service's Retry-After, else 0.5 s doubling to 8 s with jitter) for a
-- network failure, 408, 409, 429 and 5xx, the service's timeout among
-- them, up to `max_retries` (default 6 here: the service bills no failed
-- or timed-out request). A request still failing after them is left
-- without an answer (`report.unanswered`), and a run again sends it.
-- An answer that says the key or the account cannot work (401, 403,
-- `service.ACCOUNT`) stops every request: nil and that error.
--
-- This is orchestration, not an API call: it owns a run's results file,
-- its resume and its tasks; the calls themselves go through the client.
-- @module lbatch.impl.orchestration.batchchat
local json = require "lbatch.json"
local results = require "lbatch.results"
local errors = require "lbatch.impl.transport.errors"
local journal = require "lbatch.impl.orchestration.journal"
local service = require "lbatch.impl.api.service"
local now = require("lbatch.core").now

local M = { CONCURRENCY = 100, MAX_RETRIES = 6, SYNC_LINES = 256, SYNC_SECONDS = 0.5 }

local function unsupported(message)
  return errors.new({ kind = "config", code = "batch_chat_unsupported", message = "batch_chat: " .. message })
end

-- scheme, host (lowercased) and port of a URL
local function where(url)
  local scheme, host, port = url:match("^(%a[%w+.-]*)://([^/:?#@]+):?(%d*)")
  if not scheme then return nil end
  scheme = scheme:lower()
  if port == "" then port = scheme == "https" and "443" or "80" end
  return scheme, host:lower(), port
end

local function loopback(host) return host == "localhost" or host:find("^127%.%d+%.%d+%.%d+$") ~= nil end

-- The key goes only to its provider's own hosts: the client's host, a
-- host under it (batch.dashscope.aliyuncs.com under dashscope.aliyuncs.com),
-- or the provider's Batch Chat host (service.PROVIDERS). true, or nil and
-- an error (code batch_chat_host).
local function check_host(client, url)
  local scheme, host, port = where(url)
  local bs, bh, bp = where(client.base_url)
  local own = client.provider and client.provider.batch_chat_url
  local os_, oh, op = where(own or "")
  local ok = scheme and (scheme == "https" or (scheme == "http" and loopback(host)))
    and ((scheme == bs and host == bh and port == bp)
      or (port == bp and host:sub(-#bh - 1) == "." .. bh)
      or (scheme == os_ and host == oh and port == op))
  if ok then return true end
  return nil, errors.new({ kind = "config", code = "batch_chat_host", param = "batch_chat_url",
    message = ("batch_chat: %s is not on %s's own hosts (%s%s): the API key is not sent there; use the "
      .. "provider's Batch Chat URL, or a URL on the client's host"):format(url, tostring(client.config.provider),
      tostring(bh), oh and (", " .. oh) or "") })
end

--- Where a client's Batch Chat calls go: `url` when given (checked: the
-- key goes to its provider's hosts only), else its provider's
-- `batch_chat_url` in the provider's region.
-- @tparam table client
-- @tparam ?string url
-- @treturn string the base URL, or nil and an error (`batch_chat_unsupported`, `batch_chat_host`)
function M.url_of(client, url)
  local p = client.provider or {}
  if url == nil then
    if not p.batch_chat_url then
      return nil, unsupported(("%s offers no Batch Chat (DashScope's, in Beijing, is the one known): send a file "
        .. "batch instead (via = \"file\")"):format(tostring(client.config.provider)))
    end
    if p.batch_chat_region and client.region ~= p.batch_chat_region then
      return nil, unsupported(("Batch Chat is offered in region %s only; this client is in %s: make a client with "
        .. "region = %q (and its key), or pass batch_chat_url"):format(p.batch_chat_region, tostring(client.region),
        p.batch_chat_region))
    end
    -- a client pointed elsewhere (a proxy, a test server, a workspace
    -- domain) is not sent on to the service's own Batch Chat host, where
    -- its key would pay for real answers: the caller names the URL
    local home = p.regions and p.regions[client.region] or p.base_url
    if client.base_url and home and client.base_url:gsub("/+$", "") ~= home then
      return nil, errors.new({ kind = "config", code = "batch_chat_url_needed", param = "batch_chat_url",
        message = ("batch_chat: this client talks to %s, not %s: Batch Chat would go to %s, with this key, for "
          .. "real; pass batch_chat_url (the Batch Chat URL you mean; --batch-chat-url on the command line)")
          :format(client.base_url, home, p.batch_chat_url) })
    end
    url = p.batch_chat_url
  elseif not p.batch_chat_url then
    return nil, unsupported(("%s offers no Batch Chat"):format(tostring(client.config.provider)))
  end
  local ok, err = check_host(client, url)
  if not ok then return nil, err end
  return (url:gsub("/+$", ""))
end

-- the wait asked of the service, checked against the provider's range
local function wait_header(p, wait)
  local w = p.batch_chat_wait
  if wait == nil then return nil, w.default end
  if type(wait) ~= "number" or wait ~= wait or wait < w.min or wait > w.max then
    errors.arg("batch_chat", ("wait must be a number of seconds from %d to %d (the service's range)"):format(w.min,
      w.max), 4)
  end
  return { ("%s: %d"):format(w.header, math.floor(wait)) }, wait
end

-- every request line of the input files: {custom_id, body (JSON)}; a line
-- of another endpoint, or a custom_id twice, is refused
local function read_input(paths)
  local lines, seen = {}, {}
  for _, path in ipairs(paths) do
    local fh, msg = io.open(path, "rb")
    if not fh then return nil, errors.io("cannot read", path, msg) end
    local n = 0
    for text in fh:lines() do
      n = n + 1
      if text:find("%S") then
        local ok, line = pcall(json.decode, text)
        local bad = not ok or type(line) ~= "table" or type(line.custom_id) ~= "string" or type(line.body) ~= "table"
        local url = not bad and (line.url or "/v1/chat/completions")
        local why = bad and "is not a request line {custom_id, body}"
          or (url ~= "/v1/chat/completions" and ("asks %s: Batch Chat answers /v1/chat/completions only"):format(url))
          or (seen[line.custom_id] and ("repeats the custom_id %q"):format(line.custom_id))
        if why then
          fh:close()
          return nil, errors.new({ kind = "invalid", code = "batch_chat_input", path = path,
            message = ("batch_chat: %s line %d %s"):format(path, n, why) })
        end
        seen[line.custom_id] = true
        lines[#lines + 1] = { custom_id = line.custom_id, body = json.encode(line.body) }
      end
    end
    fh:close()
  end
  return lines
end

-- ------------------------------------------------------------ a job

local Job = {}
Job.__index = Job

-- the answers already in the results file (custom_id -> true), the file
-- written back without a torn last line, open for appending
local function open_results(path)
  local got, old = {}, {}
  local log, err = journal.open(path, function(rec)
    if type(rec) == "table" and type(rec.custom_id) == "string" and not got[rec.custom_id] then
      got[rec.custom_id] = true
      old[#old + 1] = rec
    end
  end, { durable = true })
  if not log then return nil, err end
  local ok, cerr = log:compact(old)
  if not ok then log:close() return nil, cerr end
  return log, got, #old
end

-- an answer as a result line, a file batch's output line
local function line_of(custom_id, status, request_id, body)
  return { id = "batchchat-" .. (request_id or custom_id), custom_id = custom_id,
           response = { status_code = status, request_id = request_id, body = body }, error = json.null }
end

-- An error that is the account's or the key's, not the request's: every
-- request would get it.
local function account_wide(e)
  return e.status == 401 or e.status == 403 or (e.code ~= nil and service.ACCOUNT[e.code] ~= nil)
end

-- An error that says the service cannot be reached at all (its name does
-- not resolve, no connection, a certificate or a proxy refused), after the
-- retries: every request would wait out its own retries for it (10,000
-- requests, 100 at once, 20 s each: half an hour for nothing).
local function unreachable(e)
  return e.not_sent == true or e.code == "tls_certificate" or e.code == "proxy_auth_required"
end

--- append one answer; synced every sync_lines or sync_seconds
function Job:record(rec)
  local ok, err = self.log:append(rec)
  if ok then
    self.unsynced = self.unsynced + 1
    if self.unsynced >= self.sync_lines or now() - self.synced_at >= self.sync_seconds then
      ok, err = self.log:sync()
      self.unsynced, self.synced_at = 0, now()
    end
  end
  if not ok then self.failure = self.failure or err end
  return ok
end

--- one request: its held call, then its answer recorded
function Job:send(item)
  local v, e = self.client:_call("POST", nil, { url = self.url .. "/chat/completions", keyed = true,
    body = item.body, headers = self.headers, timeout = self.timeout, stall = self.timeout,
    max_retries = self.max_retries, with_response = true })
  local rec
  if v ~= nil then rec = line_of(item.custom_id, e.status, e.request_id, v)
  elseif e.kind == "cancelled" then return "cancelled"
  elseif e.status and not e.retryable and not account_wide(e) then
    rec = line_of(item.custom_id, e.status, e.request_id,
      { error = { code = e.code, type = e.type, message = e.message, param = e.param } })
  else
    if account_wide(e) or unreachable(e) then self.failure = self.failure or e end
    return "unanswered", e
  end
  if not self:record(rec) then return "unanswered", self.failure end
  return "answered", rec
end

--- a worker: the next request, until none is left or the job stops
function Job:worker()
  while not self.failure do
    self.next_i = self.next_i + 1
    local item = self.queue[self.next_i]
    if not item then return end
    if self.cancelled[item.custom_id] or self.all_cancelled then
      self.counts.cancelled = self.counts.cancelled + 1
    else
      local task = self.client:spawn(Job.send, self, item)
      self.flight[item.custom_id] = task
      local outcome, x = task:join()
      self.flight[item.custom_id] = nil
      if outcome == nil then outcome = self.cancelled[item.custom_id] and "cancelled" or "unanswered" end
      self.counts[outcome] = self.counts[outcome] + 1
      if outcome == "unanswered" then self.last_error = x or self.last_error end
      if self.on_progress then
        self.on_progress({ custom_id = item.custom_id, outcome = outcome, status_code = outcome == "answered"
          and x.response.status_code or nil, done = self.counts.answered, total = #self.queue + self.reused,
          in_flight = self:in_flight(), unanswered = self.counts.unanswered })
      end
    end
  end
end

--- Requests in flight now.
-- @treturn integer
function Job:in_flight()
  local n = 0
  for _ in pairs(self.flight) do n = n + 1 end
  return n
end

--- Cancel one request (its held call stopped; not sent when still queued),
-- or, with no custom_id, every request not yet answered. A cancelled
-- request has no answer: a run again sends it.
-- @tparam[opt] string custom_id
-- @treturn boolean true when something was cancelled
function Job:cancel(custom_id)
  if custom_id == nil then
    self.all_cancelled = true
    for _, t in pairs(self.flight) do t:cancel() end
    return true
  end
  self.cancelled[custom_id] = true
  local t = self.flight[custom_id]
  return t ~= nil and t:cancel() or false
end

--- Wait for every request (yielding in a task, waiting outside one).
-- @treturn table the report {path, requests, reused, sent, answered,
-- unanswered, cancelled, complete, last_error}, or nil and the error that
-- stopped it (an account's, a write's)
function Job:wait()
  for _, w in ipairs(self.workers) do
    local _, err = w:join()
    if err and err.kind ~= "cancelled" then self.failure = self.failure or err end
  end
  local ok, serr = self.log:sync()
  self.log:close()
  if self.failure then return nil, self.failure end
  if not ok then return nil, serr end
  local c = self.counts
  return { path = self.path, requests = #self.queue + self.reused, reused = self.reused,
           sent = c.answered + c.unanswered, answered = c.answered, unanswered = c.unanswered,
           cancelled = c.cancelled, complete = c.unanswered == 0 and c.cancelled == 0,
           last_error = self.last_error, url = self.url, wait = self.wait_s }
end

local OPTS = { input = true, path = true, url = true, concurrency = true, wait = true, max_retries = true,
               sync_lines = true, sync_seconds = true, on_progress = true }

local function options(opts)
  errors.check("batch_chat", "opts", opts, "table")
  for k in pairs(opts) do
    if not OPTS[k] then errors.arg("batch_chat", ("unknown option %s"):format(tostring(k)), 3) end
  end
  errors.check("batch_chat", "opts.path", opts.path, "string")
  errors.check("batch_chat", "opts.url", opts.url, "string", true)
  errors.check("batch_chat", "opts.on_progress", opts.on_progress, "function", true)
  for _, k in ipairs({ "concurrency", "max_retries", "sync_lines", "sync_seconds" }) do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v ~= v or v < 0 or v == math.huge) then
      errors.arg("batch_chat", ("opts.%s must be a number >= 0"):format(k), 3)
    end
  end
  local input = opts.input
  if type(input) == "string" then input = { input } end
  if type(input) ~= "table" or #input == 0 then errors.arg("batch_chat", "opts.input must be a path or a list", 3) end
  return input
end

--- Start sending: the job, its requests under way (in tasks on the
-- client's scheduler).
-- @tparam table client
-- @tparam table opts input (a .jsonl path or a list of them: request
-- lines), path (the results file: also the journal a run again resumes
-- from), url (the Batch Chat base URL; default the provider's), concurrency
-- (100), wait (seconds the service holds each call, 60 to 3,600; default
-- its own, 3,600), max_retries (6), sync_lines (256), sync_seconds (0.5),
-- on_progress(p) after each request: {custom_id, outcome ("answered",
-- "unanswered", "cancelled"), status_code, done, total, in_flight, unanswered}
-- @treturn table the job (`job:cancel([custom_id])`, `job:wait()`), or nil and an error
function M.start(client, opts)
  local input = options(opts)
  local url, uerr = M.url_of(client, opts.url)
  if not url then return nil, uerr end
  local headers, wait = wait_header(client.provider, opts.wait)
  local lines, ierr = read_input(input)
  if not lines then return nil, ierr end
  local log, got, kept = open_results(opts.path)
  if not log then return nil, got end
  local queue, reused = {}, 0
  for _, item in ipairs(lines) do
    if got[item.custom_id] then reused = reused + 1 else queue[#queue + 1] = item end
  end
  local self = setmetatable({ client = client, url = url, headers = headers, wait_s = wait, timeout = wait + 60,
    max_retries = opts.max_retries or M.MAX_RETRIES, log = log, path = opts.path, queue = queue, next_i = 0,
    reused = reused, kept = kept, flight = {}, cancelled = {}, workers = {}, on_progress = opts.on_progress,
    counts = { answered = 0, unanswered = 0, cancelled = 0 }, unsynced = 0, synced_at = now(),
    sync_lines = math.max(1, opts.sync_lines or M.SYNC_LINES), sync_seconds = opts.sync_seconds or M.SYNC_SECONDS },
    Job)
  for i = 1, math.min(#queue, math.max(1, math.floor(opts.concurrency or M.CONCURRENCY))) do
    self.workers[i] = client:spawn(Job.worker, self)
  end
  return self
end

--- Send every request and wait for them: `start`, then `wait`.
-- @tparam table client
-- @tparam table opts as `start`
-- @treturn table the report (see `Job:wait`), or nil and an error
function M.run(client, opts)
  local job, err = M.start(client, opts)
  if not job then return nil, err end
  return job:wait()
end

-- ------------------------------------------------------------ pipeline.run{via = "batch_chat"}

local UNSUPPORTED = { "max_cost", "notify", "resubmit", "canary" }

--- `pipeline.run{via = "batch_chat", ...}`: the input written as a file
-- batch's request files (`shard`, the pipeline's: JSONL, CSV, a list, an
-- iterator, with model, system, endpoint and limits applied) under
-- dir/batch-chat/, then sent through Batch Chat into
-- dir/batch-chat/results.jsonl, the dir locked meanwhile (`lock`).
-- Options beside the pipeline's: batch_chat_url, concurrency, wait,
-- max_retries, sync_lines, sync_seconds, on_request(p) (`start`'s
-- on_progress), on_job(job) (the job, to cancel requests).
-- @tparam table opts the pipeline's options
-- @tparam table client
-- @tparam table pl the pipeline's `shard(opts, dir, client)` and `lock(opts, client)`
-- @treturn table the report {via, results, outputs, errors, inputs, groups,
-- journal, client, shards ({}), requests, reused, sent, answered,
-- unanswered, cancelled, complete}, or nil and an error
function M.pipeline(opts, client, pl)
  if opts.via ~= "batch_chat" then errors.arg("pipeline.run", 'opts.via must be "file" or "batch_chat"', 3) end
  for _, k in ipairs(UNSUPPORTED) do
    if opts[k] ~= nil then
      return nil, errors.new({ kind = "invalid", code = "batch_chat_option", param = k, message = ("pipeline: %s "
        .. "is not supported with via = \"batch_chat\" (yet): nothing was sent"):format(k) })
    end
  end
  local dir = opts.dir .. "/batch-chat"
  for _, d in ipairs({ opts.dir, dir }) do
    local made, why = require("lbatch.core").mkdir(d)
    if not made then return nil, errors.io("cannot make", d, (why:gsub("^mkdir [^:]*: ", ""))) end
  end
  local lk, lerr = pl.lock(opts, client)
  if not lk then return nil, lerr end
  return lk:release(M.run_dir(opts, client, pl, dir))
end

--- The pipeline door's work, in `dir` (dir/batch-chat): shard, send, read.
function M.run_dir(opts, client, pl, dir)
  local manifest, serr = pl.shard(opts, dir, client)
  if not manifest then return nil, serr end
  local inputs = {}
  for i, f in ipairs(manifest.files) do inputs[i] = f.path end
  local path = dir .. "/results.jsonl"
  local job, err = M.start(client, { input = inputs, path = path, url = opts.batch_chat_url,
    concurrency = opts.concurrency, wait = opts.wait, max_retries = opts.max_retries, sync_lines = opts.sync_lines,
    sync_seconds = opts.sync_seconds, on_progress = opts.on_request })
  if not job then return nil, err end
  if opts.on_job then opts.on_job(job) end
  local report, werr = job:wait()
  if not report then return nil, werr end
  local reader, rerr = M.results(path, inputs)
  if not reader then return nil, rerr end
  report.via, report.results, report.outputs, report.errors, report.inputs = "batch_chat", reader, { path }, {}, inputs
  report.groups, report.journal, report.client, report.shards = { { inputs = inputs, output = path } }, path, client, {}
  return report
end

--- A reader of a job's results (`lbatch.results`), joined with its input.
-- @tparam string path the results file
-- @param input a path or a list of paths
-- @return the reader, or nil and an error
function M.results(path, input)
  return results.open({ output = path, inputs = input })
end

return M
