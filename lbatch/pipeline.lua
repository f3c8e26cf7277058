--- A pipeline: requests in, merged results out. It shards (lbatch.jsonl),
-- uploads, creates, waits and downloads with at most N jobs in flight, and
-- keeps a journal of every step (written atomically). Killed at any moment
-- and started again on the same journal, it resumes: nothing is uploaded or
-- created twice, no result is lost.
--
--   local report = assert(pipeline.run{ client = client, requests = "questions.csv",
--                                       model = "qwen-plus", dir = "work" })
--   for rec in report.results:each() do ... end
--
-- How a step that may have happened is recognised after a crash:
--   uploading: each shard is uploaded under a name unique to this run; a
--              file of that name in the newest files is the upload.
--   creating:  a shard's file is used by one batch only; a batch with that
--              input file is the create.
-- @module lbatch.pipeline
local core = require "lbatch.core"
local jsonl = require "lbatch.jsonl"
local json = require "lbatch.json"
local csv = require "lbatch.csv"
local results = require "lbatch.results"
local errors = require "lbatch.errors"
local journal = require "lbatch.journal"
local service = require "lbatch.service"
local rules = require "lbatch.rules"
local recover = require "lbatch.recover"

local try, throw = errors.try, errors.throw

local M = {}

local function fail(message)
  return errors.new({ kind = "invalid", message = "pipeline: " .. message })
end

-- ------------------------------------------------------------ journal

-- The journal (lbatch.journal) holds a header record, then a record per
-- change: a shard's new state ({k, shard}) or the run's phase ({phase}).
-- A change costs one short append however many shards there are.
local function open_journal(path)
  local state
  local j, err = journal.open(path, function(rec)
    if rec.version == 1 then state = { version = 1, run = rec.run, phase = rec.phase, shards = {} }
    elseif state and rec.k then state.shards[rec.k] = rec.shard
    elseif state and rec.phase then state.phase = rec.phase end
  end)
  if not j then return nil, err end
  return j, nil, state
end

-- the whole state as records, for a compaction
local function snapshot(state)
  local recs = { { version = 1, run = state.run, phase = state.phase } }
  for k, s in ipairs(state.shards) do recs[#recs + 1] = { k = k, shard = s } end
  return recs
end

local function token()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(6) or tostring(os.time() + math.random())
  if f then f:close() end
  return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- ------------------------------------------------------------ disk

local size = require "lbatch.size"
local function size_of(path) return size.file(path) or 0 end
local human = size.human

-- The disk must hold what the run will write: copies of the requests and
-- the answers (an output file is typically two to three times its input:
-- `disk_factor`, default 3). Checked before any work, so a full disk is a
-- clear error at the start and not a failed download halfway.
local function room(opts, dir, input_bytes, copies)
  if opts.check_disk == false or input_bytes <= 0 then return true end
  local need = input_bytes * (copies + (opts.disk_factor or 3))
  local free, why = core.disk_free(dir)
  if not free then return nil, errors.io("cannot tell the free space of", dir, why) end
  if free < need then
    return nil, errors.new({ kind = "io", code = "disk_full", path = dir, message = ("pipeline: %s has %s free; "
      .. "this run needs about %s (%s of requests, answers up to %gx that); free some space or set disk_factor")
      :format(dir, human(free), human(need), human(input_bytes), opts.disk_factor or 3) })
  end
  return true
end

-- ------------------------------------------------------------ sharding

-- requests: a .jsonl or .csv path, a list of requests, or an iterator
-- returning them; a request is {custom_id, body[, url]} or a full line.
local function shard(opts, dir, client)
  local w = jsonl.writer({ path = dir .. "/requests.jsonl", endpoint = opts.endpoint, model = opts.model,
                           limits = opts.limits, max_lines = opts.max_lines, max_bytes = opts.max_bytes,
                           unique = "all" })
  local function add(r)
    if type(r) ~= "table" then throw(fail("a request must be a table")) end
    client:pause()                     -- a host's frame goes on
    local ok, err
    if r.method then ok, err = w:request(r) else ok, err = w:add(r.custom_id, r.body, r.url) end
    if not ok then throw(err) end
  end
  local src = opts.requests
  local ok, err = pcall(function()
    if type(src) == "string" and src:find("%.csv$") then
      w:close()
      local m, e = csv.to_jsonl(src, { path = dir .. "/requests.jsonl", model = opts.model,
        system = opts.system, endpoint = opts.endpoint, max_lines = opts.max_lines,
        max_bytes = opts.max_bytes, unique = "all", limits = opts.limits })
      if not m then throw(e) end
      w = { close = function() return m end }
    elseif type(src) == "string" then
      local fh, msg = io.open(src, "rb")
      if not fh then throw(errors.io("cannot read", src, msg)) end
      local max_line = w.profile.max_line_bytes
      local okr, rerr = pcall(function()
        for n, line in rules.lines(fh, max_line) do
          if not line then      -- too long to keep: the writer's rule, not a silent skip
            throw(errors.new({ kind = "invalid", code = "line_too_large", message = ("%s line %d is larger than "
              .. "the %d bytes allowed (%s)"):format(src, n, max_line, w.profile.name) }))
          elseif line:find("%S") then
            local okj, r = pcall(json.decode, line)
            if not okj then throw(fail(("%s line %d is not JSON"):format(src, n))) end
            add(r)
          end
        end
      end)
      fh:close()
      rerr = errors.thrown(rerr) or rerr
      if not okr then throw(errors.is(rerr) and rerr or errors.io("cannot read", src, rerr)) end
    elseif type(src) == "table" then
      for _, r in ipairs(src) do add(r) end
    elseif type(src) == "function" then
      for r in src do add(r) end
    else
      throw(fail("requests must be a path, a list or an iterator"))
    end
  end)
  local manifest, cerr = w:close()
  if not ok then
    err = errors.thrown(err) or err
    return nil, errors.is(err) and err or fail(tostring(err))
  end
  if not manifest then return nil, cerr end
  if #manifest.files == 0 then return nil, fail("no requests") end
  return manifest
end

-- ------------------------------------------------------------ one shard

local PARTIAL = service.PARTIAL

local Run = {}
Run.__index = Run

-- A change is appended at the end of the loop's turn (one write for all
-- the shards that moved), before any request made in that turn goes out.
function Run:save(s) self.dirty[s] = true end

function Run:flush()
  if next(self.dirty) then
    local recs = {}
    for k, s in ipairs(self.state.shards) do
      if self.dirty[s] then recs[#recs + 1] = { k = k, shard = s } end
    end
    self.dirty = {}
    local ok, err = self.log:append((table.unpack or unpack)(recs))
    -- past 16 changes a shard (a shard's whole life takes about 8), the
    -- journal is written again as the live state: it stays small and
    -- replays fast at any number of shards, and a host's frame rarely pays
    -- for the rewrite (about 2 ms at 100 shards)
    if ok and self.log.appended > 16 * #self.state.shards + 1024 then
      ok, err = self.log:compact(snapshot(self.state))
    end
    if not ok then self.failure = self.failure or err end
  end
  if self.moved then
    self.moved = false
    self:report_progress()
  end
end

function Run:hook(step, s)
  if self.opts.on_step then self.opts.on_step(step, s) end
end

-- per-call options that report a shard's transfer to opts.on_transfer
function Run:transfer_watch(s, direction)
  local cb = self.opts.on_transfer
  if not cb then return nil end
  return { on_progress = function(done, total) cb(s.name, direction, done, total) end }
end

-- progress is summed up once per turn, however many shards moved
function Run:progress() self.moved = true end

function Run:report_progress()
  local cb = self.opts.on_progress
  if not cb then return end
  local p = { jobs = {}, shards = #self.state.shards, total = 0, completed = 0, failed = 0,
              elapsed = os.time() - self.started }
  for _, s in ipairs(self.state.shards) do
    local st = s.status or s.step
    p.jobs[st] = (p.jobs[st] or 0) + 1
    local c = s.counts
    if s.round == 1 then p.total = p.total + s.lines end
    if c then p.completed, p.failed = p.completed + (c.completed or 0), p.failed + (c.failed or 0) end
  end
  local done = p.completed + p.failed
  if done > 0 and done < p.total then p.eta = math.floor(p.elapsed * (p.total - done) / done) end
  cb(p)
end

-- the file this run uploaded under `name`, if the service has it (a
-- failure to look is thrown: uploading again could make a second file)
function Run:find_upload(name)
  local client = self.client
  local f, err = recover.upload(function(q) return client:list_files(q) end, { filename = name })
  if err then try(nil, err) end
  return f
end

-- the batch made from `file_id`, if any (a failure to look is thrown)
function Run:find_batch(file_id)
  local client = self.client
  local b, err = recover.batch(function(q) return client:list_batches(q) end, { input_file_id = file_id })
  if err then try(nil, err) end
  return b
end

function Run:process(s)
  local client, opts = self.client, self.opts
  if s.step == "written" or s.step == "uploading" then
    local f
    if s.step == "uploading" then f = self:find_upload(s.name) end
    if not f then
      s.step = "uploading"
      self:save(s)
      self:hook("before_upload", s)
      f = try(client:upload(s.path, { filename = s.name }, self:transfer_watch(s, "up")))
      self:hook("after_upload", s)
    end
    s.file_id, s.step = f.id, "uploaded"
    self:save(s)
  end
  if s.step == "uploaded" or s.step == "creating" then
    local b
    if s.step == "creating" then b = self:find_batch(s.file_id) end
    if not b then
      s.step = "creating"
      self:save(s)
      local metadata = opts.metadata
      if type(metadata) == "function" then metadata = metadata(s) end
      b = try(client:create({ input_file_id = s.file_id, endpoint = s.endpoint,
        completion_window = opts.completion_window, metadata = metadata }))
      self:hook("after_create", s)
    end
    s.batch_id, s.step, s.status = b.id, "created", b.status
    self:save(s)
    self:progress()
  end
  if s.step == "created" then
    self:hook("waiting", s)
    local b = try(client:wait(s.batch_id, {
      interval = opts.poll_interval, max_interval = opts.max_poll_interval, factor = opts.poll_factor,
      on_progress = function(b)
        s.status, s.counts = b.status, b.request_counts
        self:progress()
      end,
    }))
    s.status, s.counts, s.step = b.status, b.request_counts, "finished"
    s.output_file_id, s.error_file_id = b.output_file_id, b.error_file_id
    if b.errors and b.errors.data then s.errors = b.errors.data end
    self:save(s)
  end
  if s.step == "finished" then
    local base = s.path:gsub("%.jsonl$", "")
    local function fetch(id, path)
      local o = self:transfer_watch(s, "down") or {}
      o.path = path
      return try(client:content(id, o))
    end
    if s.output_file_id then s.output = fetch(s.output_file_id, base .. ".output.jsonl") end
    if s.error_file_id then s.error = fetch(s.error_file_id, base .. ".errors.jsonl") end
    self:hook("after_download", s)
    s.step = "downloaded"
    self:save(s)
  end
  if s.step == "downloaded" then
    -- the new shard and this one's end are saved together
    if PARTIAL[s.status] and opts.resubmit and s.round < (opts.max_rounds or 3) then
      local path = s.path:gsub("%.jsonl$", "") .. ".r" .. (s.round + 1) .. ".jsonl"
      local r = results.open({ output = s.output, errors = s.error, inputs = s.path })
      local n = try(r:resubmit(path))
      if n > 0 then
        local k = #self.state.shards + 1
        self.state.shards[k] = { path = path, name = self.state.run .. "-" .. k .. ".jsonl", lines = n,
          model = s.model, endpoint = s.endpoint, round = s.round + 1, step = "written", origin = s.origin or s.path }
        self.queue[#self.queue + 1] = self.state.shards[k]
        self:save(self.state.shards[k])
      end
    end
    s.step = "done"
    self:save(s)
    self:progress()
  end
end

-- ------------------------------------------------------------ run

-- what a worker raised, as an error object
local function as_error(e)
  e = errors.thrown(e) or e
  if errors.is(e) then return e end
  return errors.new({ kind = "task", code = "pipeline_failed", message = tostring(e),
                      traceback = debug.traceback(tostring(e), 2) })
end

--- Run a whole job: shard, upload, create, wait, download, merge.
-- Killed at any moment and run again on the same `dir`, it resumes from
-- its journal: nothing is uploaded or created twice.
-- @tparam table opts client, requests (a .jsonl or .csv path, a list of
-- requests, or an iterator returning them; a request is `{custom_id, body[,
-- url]}` or a whole line), dir, journal (default dir/journal.jsonl),
-- model, endpoint, system, limits (a profile name, as in `jsonl.writer`),
-- max_lines, max_bytes, max_in_flight (8),
-- completion_window, metadata (a table, or fn(shard) -> table),
-- poll_interval, max_poll_interval, poll_factor, resubmit, max_rounds,
-- disk_factor (3: answers up to 3x the requests' size; the free space is
-- checked first, `check_disk = false` to skip),
-- on_progress(p), on_step(step, shard), on_transfer(shard_name,
-- "up" | "down", bytes, total)
-- @treturn table the report `{shards, results (a reader), outputs,
-- errors, inputs, journal}`, or nil and an error
function M.run(opts)
  errors.check("pipeline.run", "opts", opts, "table")
  errors.check("pipeline.run", "opts.client", opts.client, "table")
  errors.check("pipeline.run", "opts.dir", opts.dir, "string")
  local client = opts.client
  local made, why = core.mkdir(opts.dir)
  if not made then return nil, errors.io("cannot make", opts.dir, why:gsub("^mkdir [^:]*: ", "")) end
  local path = opts.journal or (opts.dir .. "/journal.jsonl")
  local log, jerr, state = open_journal(path)
  if not log then return nil, jerr end
  if not state or state.phase == "sharding" then
    if type(opts.requests) == "string" then
      local fits, ferr = room(opts, opts.dir, size_of(opts.requests), 1)
      if not fits then log:close() return nil, ferr end
    end
    state = { version = 1, run = token(), phase = "sharding", shards = {} }
    local ok, err = log:compact(snapshot(state))
    if not ok then log:close() return nil, err end
    client:pause()
    local manifest
    manifest, err = shard(opts, opts.dir, client)
    if not manifest then log:close() return nil, err end
    for i, f in ipairs(manifest.files) do
      state.shards[i] = { path = f.path, name = state.run .. "-" .. i .. ".jsonl", lines = f.lines,
        model = f.model, endpoint = f.endpoint, round = 1, step = "written" }
    end
    state.phase = "running"
    client:pause()
  end
  local ok, cerr = log:compact(snapshot(state))
  if not ok then log:close() return nil, cerr end
  local pending = 0                      -- the requests whose answers are still to come
  for i, s in ipairs(state.shards) do
    if s.step ~= "downloaded" and s.step ~= "done" then pending = pending + size_of(s.path) end
    if i % 16 == 0 then client:pause() end      -- a host's frame stays short
  end
  ok, cerr = room(opts, opts.dir, pending, 0)
  if not ok then log:close() return nil, cerr end
  local run = setmetatable({ client = client, opts = opts, journal = path, state = state,
                             queue = {}, started = os.time(), dirty = {}, log = log }, Run)
  client:pause()
  local unhook = client:at_turn_end(function() run:flush() end)
  for _, s in ipairs(state.shards) do
    if s.step ~= "done" then run.queue[#run.queue + 1] = s end
  end
  if state.phase ~= "done" then
    local failure, busy = nil, 0
    -- a worker takes the next shard; idle, it waits while a shard in
    -- progress may still add a resubmitted one
    local function worker()
      while not failure do
        local s = table.remove(run.queue, 1)
        if s then
          busy = busy + 1
          local done, err = pcall(run.process, run, s)
          busy = busy - 1
          if not done then failure = failure or as_error(err) end
        elseif busy == 0 then
          return
        else
          client:sleep(0.05)
        end
      end
    end
    local workers = {}
    for i = 1, math.max(1, opts.max_in_flight or 8) do
      workers[i] = client:spawn(worker)
      client:pause()
    end
    for _, w in ipairs(workers) do
      local _, err = w:join()
      if err then failure = failure or err end
    end
    run:flush()
    failure = failure or run.failure
    if failure then unhook() log:close() return nil, failure end
    state.phase = "done"
    local done, err = log:append({ phase = "done" })
    if not done then unhook() log:close() return nil, err end
  end
  unhook()
  log:close()
  client:pause()
  -- each first-round shard is joined with its own answers and those of its
  -- resubmissions (later rounds first: their answers are newer), so the
  -- merge holds one shard's index at a time, whatever the total
  local outputs, errs, inputs, groups, by_path = {}, {}, {}, {}, {}
  for _, s in ipairs(state.shards) do
    if s.output then outputs[#outputs + 1] = s.output end
    if s.error then errs[#errs + 1] = s.error end
    if s.round == 1 then
      inputs[#inputs + 1] = s.path
      by_path[s.path] = { inputs = s.path, output = {}, errors = {} }
      groups[#groups + 1] = by_path[s.path]
    end
  end
  for i = #state.shards, 1, -1 do
    local s = state.shards[i]
    local g = by_path[s.origin or s.path]
    if g then
      if s.output then g.output[#g.output + 1] = s.output end
      if s.error then g.errors[#g.errors + 1] = s.error end
    end
  end
  local reader, rerr = results.open({ groups = groups, pause = function() client:pause() end })
  if not reader then return nil, rerr end
  return { shards = state.shards, outputs = outputs, errors = errs, inputs = inputs, journal = path,
           results = reader }
end

return M
