-- A pipeline: requests in, merged results out. It shards (lbatch.jsonl),
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
local cjson = require "cjson"
local core = require "lbatch.core"
local jsonl = require "lbatch.jsonl"
local csv = require "lbatch.csv"
local results = require "lbatch.results"
local errors = require "lbatch.errors"

local M = {}

local function fail(message)
  return errors.new({ kind = "invalid", message = "pipeline: " .. message })
end

------------------------------------------------------------------ journal

-- The journal is append-only: a header line, then a line per change (a
-- shard's new state, or the run's phase). A change costs one short append
-- however many shards there are; a process killed mid-write leaves at most
-- a torn last line, which load() skips. load() replays it and writes it
-- back compacted (to a temp file, renamed over).
local function load(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local state
  for line in f:lines() do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" then
      if rec.version == 1 then state = { version = 1, run = rec.run, phase = rec.phase, shards = {} }
      elseif state and rec.k then state.shards[rec.k] = rec.shard
      elseif state and rec.phase then state.phase = rec.phase end
    end
  end
  f:close()
  return state
end

local function header(state)
  return cjson.encode({ version = 1, run = state.run, phase = state.phase }) .. "\n"
end

local function shard_line(k, s)
  return cjson.encode({ k = k, shard = s }) .. "\n"
end

-- the whole state, written aside and renamed over; returns the journal
-- opened for appending
local function rewrite(path, state)
  local tmp = path .. ".tmp"
  local f = assert(io.open(tmp, "wb"))
  f:write(header(state))
  for k, s in ipairs(state.shards) do f:write(shard_line(k, s)) end
  f:close()
  assert(os.rename(tmp, path))
  return assert(io.open(path, "ab"))
end

local function token()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(6) or tostring(os.time() + math.random())
  if f then f:close() end
  return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

------------------------------------------------------------------ sharding

-- requests: a .jsonl or .csv path, a list of requests, or an iterator
-- returning them; a request is {custom_id, body[, url]} or a full line.
local function shard(opts, dir, client)
  local loop = client.loop
  local w = jsonl.writer({ path = dir .. "/requests.jsonl", endpoint = opts.endpoint, model = opts.model,
                           max_lines = opts.max_lines, max_bytes = opts.max_bytes, unique = "all" })
  local function add(r)
    if type(r) ~= "table" then error(fail("a request must be a table"), 0) end
    loop:pause()                       -- a host's frame goes on
    local ok, err
    if r.method then ok, err = w:request(r) else ok, err = w:add(r.custom_id, r.body, r.url) end
    if not ok then error(err, 0) end
  end
  local src = opts.requests
  local ok, err = pcall(function()
    if type(src) == "string" and src:find("%.csv$") then
      w:close()
      local m, e = csv.to_jsonl(src, { path = dir .. "/requests.jsonl", model = opts.model,
        system = opts.system, endpoint = opts.endpoint, max_lines = opts.max_lines,
        max_bytes = opts.max_bytes, unique = "all" })
      if not m then error(e, 0) end
      w = { close = function() return m end }
    elseif type(src) == "string" then
      local fh, msg = io.open(src, "rb")
      if not fh then error(fail("cannot read " .. tostring(msg)), 0) end
      local n = 0
      for line in fh:lines() do
        n = n + 1
        if line:find("%S") then
          local okj, r = pcall(cjson.decode, line)
          if not okj then fh:close() error(fail(("%s line %d is not JSON"):format(src, n)), 0) end
          add(r)
        end
      end
      fh:close()
    elseif type(src) == "table" then
      for _, r in ipairs(src) do add(r) end
    elseif type(src) == "function" then
      for r in src do add(r) end
    else
      error(fail("requests must be a path, a list or an iterator"), 0)
    end
  end)
  local manifest = w:close()
  if not ok then return nil, err end
  if #manifest.files == 0 then return nil, fail("no requests") end
  return manifest
end

------------------------------------------------------------------ one shard

local PARTIAL = { expired = true, cancelled = true }

local Run = {}
Run.__index = Run

-- A change is appended at the end of the loop's turn (one write for all
-- the shards that moved), before any request made in that turn goes out.
function Run:save(s) self.dirty[s] = true end

function Run:flush()
  if next(self.dirty) then
    local lines = {}
    for k, s in ipairs(self.state.shards) do
      if self.dirty[s] then lines[#lines + 1] = shard_line(k, s) end
    end
    self.dirty = {}
    self.log:write(table.concat(lines))
    self.log:flush()
  end
  if self.moved then
    self.moved = false
    self:report_progress()
  end
end

function Run:hook(step, s)
  if self.opts.on_step then self.opts.on_step(step, s) end
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

-- the file this run uploaded under `name`, if the service has it
function Run:find_upload(name)
  local page, err = self.client:files({ limit = 100, order = "desc" })
  if not page then return nil, err end
  for _, f in ipairs(page.data) do
    if f.filename == name then return f end
  end
end

-- the batch made from `file_id`, if any
function Run:find_batch(file_id)
  local page, err = self.client:list({ input_file_ids = { file_id }, limit = 100 })
  if not page then return nil, err end
  for _, b in ipairs(page.data) do
    if b.input_file_id == file_id then return b end
  end
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
      f = assert(client:upload(s.path, { filename = s.name }))
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
      b = assert(client:create({ input_file_id = s.file_id, endpoint = s.endpoint,
        completion_window = opts.completion_window, metadata = metadata }))
      self:hook("after_create", s)
    end
    s.batch_id, s.step, s.status = b.id, "created", b.status
    self:save(s)
    self:progress()
  end
  if s.step == "created" then
    self:hook("waiting", s)
    local b = assert(client:wait(s.batch_id, {
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
    if s.output_file_id then s.output = assert(client:content(s.output_file_id, { path = base .. ".output.jsonl" })) end
    if s.error_file_id then s.error = assert(client:content(s.error_file_id, { path = base .. ".errors.jsonl" })) end
    self:hook("after_download", s)
    s.step = "downloaded"
    self:save(s)
  end
  if s.step == "downloaded" then
    -- the new shard and this one's end are saved together
    if PARTIAL[s.status] and opts.resubmit and s.round < (opts.max_rounds or 3) then
      local path = s.path:gsub("%.jsonl$", "") .. ".r" .. (s.round + 1) .. ".jsonl"
      local r = results.open({ output = s.output, errors = s.error, inputs = s.path })
      local n = assert(r:resubmit(path))
      if n > 0 then
        local k = #self.state.shards + 1
        self.state.shards[k] = { path = path, name = self.state.run .. "-" .. k .. ".jsonl", lines = n,
          model = s.model, endpoint = s.endpoint, round = s.round + 1, step = "written" }
        self.queue[#self.queue + 1] = self.state.shards[k]
        self:save(self.state.shards[k])
      end
    end
    s.step = "done"
    self:save(s)
    self:progress()
  end
end

------------------------------------------------------------------ run

-- run{client, requests, dir, journal, model, endpoint, system, max_lines,
-- max_bytes, max_in_flight = 8, completion_window, metadata (a table, or
-- fn(shard) -> table: shard.round, shard.name, ...), poll_interval,
-- max_poll_interval, poll_factor, resubmit, max_rounds, on_progress(p),
-- on_step(step, shard)} -> report {shards, results (a reader), outputs,
-- errors, inputs, journal} or nil, err
function M.run(opts)
  if type(opts) ~= "table" then error("pipeline.run: a table is expected", 2) end
  if type(opts.client) ~= "table" then error("pipeline.run: opts.client is required", 2) end
  if type(opts.dir) ~= "string" then error("pipeline.run: opts.dir is required", 2) end
  local loop = opts.client.loop
  local made, why = core.mkdir(opts.dir)
  if not made then return nil, fail(why) end
  local journal = opts.journal or (opts.dir .. "/journal.jsonl")
  local state = load(journal)
  if not state or state.phase == "sharding" then
    state = { version = 1, run = token(), phase = "sharding", shards = {} }
    rewrite(journal, state):close()
    local manifest, err = shard(opts, opts.dir, opts.client)
    if not manifest then return nil, err end
    for i, f in ipairs(manifest.files) do
      state.shards[i] = { path = f.path, name = state.run .. "-" .. i .. ".jsonl", lines = f.lines,
        model = f.model, endpoint = f.endpoint, round = 1, step = "written" }
    end
    state.phase = "running"
    loop:pause()
  end
  local run = setmetatable({ client = opts.client, opts = opts, journal = journal, state = state,
                             queue = {}, started = os.time(), dirty = {},
                             log = rewrite(journal, state) }, Run)
  loop:pause()
  local unhook = loop:at_turn_end(function() run:flush() end)
  for _, s in ipairs(state.shards) do
    if s.step ~= "done" then run.queue[#run.queue + 1] = s end
  end
  if state.phase ~= "done" then
    local client, failure, busy = opts.client, nil, 0
    -- a worker takes the next shard; idle, it waits while a shard in
    -- progress may still add a resubmitted one
    local function worker()
      while not failure do
        local s = table.remove(run.queue, 1)
        if s then
          busy = busy + 1
          local ok, err = pcall(run.process, run, s)
          busy = busy - 1
          if not ok then failure = failure or err end
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
      loop:pause()
    end
    for _, w in ipairs(workers) do
      local ok, err = w:join()
      if ok == nil and err then failure = failure or err end
    end
    run:flush()
    if failure then unhook() run.log:close() return nil, failure end
    state.phase = "done"
    run.log:write(cjson.encode({ phase = "done" }), "\n")
  end
  unhook()
  run.log:close()
  local outputs, errs, inputs = {}, {}, {}
  for _, s in ipairs(state.shards) do
    if s.output then outputs[#outputs + 1] = s.output end
    if s.error then errs[#errs + 1] = s.error end
    if s.round == 1 then inputs[#inputs + 1] = s.path end
  end
  return {
    shards = state.shards, outputs = outputs, errors = errs, inputs = inputs, journal = journal,
    results = results.open({ output = outputs, errors = errs, inputs = inputs }),
  }
end

return M
