--- The watcher: one budget of status calls per client, and one poller for
-- every `wait` on it.
--
-- The service limits status calls per account (DashScope: `list` 100 a
-- minute; `retrieve` 1,000, or 300 under the older document). Each client
-- holds a token bucket of `poll_budget` status calls a minute (default:
-- the lower of its profile's `list` and `retrieve` limits), which never
-- lets more than that many go out in any 60 seconds. Every `wait` (and so
-- every pipeline shard) registers its batch here; a single poller task
-- asks, when few batches are due, one `retrieve` each, and when several
-- are, one `list` page (100 batches) after another, newest first, until it
-- has seen them all (on DashScope, a handful of due batches are asked for
-- by their input files in one call). What a page does not show is asked
-- for by `retrieve`. Each batch keeps its own backoff (interval, factor,
-- max_interval, jitter) and deadline. A wait asks at once, then after
-- FIRST seconds, the pause doubling up to its interval (a minute by
-- default, the service's guidance once a job runs): a job that ends in
-- seconds is seen in seconds; from there the pause grows by its factor.
-- @module lbatch.impl.api.watch
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"
local now = require("lbatch.core").now

local M = {}
local Watch = {}
Watch.__index = Watch

local LIST_FROM = 3          -- due batches from which a list page pays
local BY_FILE_MAX = 20       -- due batches asked for by input file in one call (DashScope)
local IDLE = 1               -- the poller's longest sleep: a new wait is seen this soon
local HINT_GAP = 0.5         -- seconds: a job is fetched for notices at most this often
local HINTED_MAX = 10000     -- batch ids remembered as told of before their wait began
local FIRST = 3              -- seconds: the pause after a wait's first poll (doubling up to its interval)
local WARM = 2               -- the pause's factor until it reaches the wait's interval

--- A watcher: what it needs of a client, and nothing else.
-- @tparam table o loop (the scheduler's: its clock, sleep, tasks),
-- per_minute (the budget of status calls a minute), dialect, and the two
-- calls it makes: retrieve(id) -> batch | nil, err and list(query) ->
-- page | nil, err
-- @treturn table the watcher
function M.new(o)
  local per_minute = o.per_minute
  local burst = math.max(1, math.floor(per_minute / 10))
  return setmetatable({
    loop = o.loop, retrieve = o.retrieve, list = o.list, dialect = o.dialect,
    per_minute = per_minute, rate = math.max(per_minute - burst, 1) / 60, burst = burst,
    tokens = burst, at = now(), jobs = {}, ids = {}, count = 0, calls = 0, poller = nil,
    hinted = {}, nhinted = 0, told = false, hints = 0,
  }, Watch)
end

-- a job no longer watched (its end, or its waiter gone)
local function forget(self, job)
  if self.jobs[job] then
    self.jobs[job] = nil
    self.count = self.count - 1
    local same = self.ids[job.id]
    same[job] = nil
    if not next(same) then self.ids[job.id] = nil end
  end
end

-- a waiting task was cancelled: its batch is not polled for it any more
local function unwatch(_, job) forget(job.watch, job) end

local function register(_, w, job)
  job.waiter = w
  w.undo, w.undo_arg = unwatch, job
end

-- hand a job its end: the batch, or nil and an error
local function settle(self, job, b, err)
  forget(self, job)
  if job.waiter then self.loop:wake(job.waiter, b, err) else job.result = { b, err } end
end

-- end the waits whose deadline has passed
local function expire(self)
  local t = now()
  for job in pairs(self.jobs) do
    if job.stop and t >= job.stop then
      local e = errors.new({ kind = "timeout", code = "wait_deadline",
        message = ("batch %s is still %s at the wait deadline"):format(job.id,
          tostring(job.batch and job.batch.status or "unseen")) })
      e.batch = job.batch
      settle(self, job, nil, e)
    end
  end
end

--- Take one status call from the budget, sleeping until there is one
-- (waits reaching their deadline meanwhile end).
-- @treturn boolean false when nothing is watched any more
function Watch:take()
  while true do
    expire(self)
    if self.count == 0 then return false end
    local t = now()
    self.tokens = math.min(self.burst, self.tokens + (t - self.at) * self.rate)
    self.at = t
    if self.tokens >= 1 then
      self.tokens = self.tokens - 1
      self.calls = self.calls + 1
      return true
    end
    self.loop:sleep(math.min((1 - self.tokens) / self.rate, IDLE))
  end
end

-- what a batch's answer means for a job: progress, its end, or its next poll
local function seen(self, job, b)
  job.batch = b
  job.created_at = tonumber(b.created_at) or job.created_at
  job.input_file_id = b.input_file_id or job.input_file_id
  local c = type(b.request_counts) == "table" and b.request_counts or {}
  local sig = ("%s %s %s %s"):format(tostring(b.status), c.total, c.completed, c.failed)
  if sig ~= job.last then
    job.last = sig
    if job.o.on_progress then
      local ok, raised = pcall(job.o.on_progress, b)
      -- raised again in the waiter (see wait): it is the waiter's callback
      if not ok then return settle(self, job, nil, errors.box(raised)) end
    end
  end
  if service.FINAL[b.status] then return settle(self, job, b) end
  local o = job.o
  -- stuck: in one status past stuck_after seconds (told once a status)
  if b.status ~= job.status then job.status, job.since, job.told = b.status, now(), false end
  if o.stuck_after and not job.told and now() - job.since >= o.stuck_after then
    job.told = true
    if o.on_stuck then
      local ok, raised = pcall(o.on_stuck, b, now() - job.since)
      if not ok then return settle(self, job, nil, errors.box(raised)) end
    end
  end
  local pause = job.interval * (1 + o.jitter * (2 * math.random() - 1))
  -- the next poll counts from the start of this round: the batches a
  -- round saw are due together, and the next round finds them on the same
  -- pages at the same pace (an end is seen within one interval)
  local t = self.round or now()
  if job.stop and t + pause > job.stop then
    local e = errors.new({ kind = "timeout", code = "wait_deadline",
      message = ("batch %s is still %s at the wait deadline"):format(job.id, tostring(b.status)) })
    e.batch = b
    return settle(self, job, nil, e)
  end
  job.due = t + pause
  if job.interval < o.interval then job.interval = math.min(job.interval * WARM, o.interval)
  else job.interval = math.min(job.interval * o.factor, o.max_interval) end
end

local function retrieve(self, job)
  if not self:take() or not self.jobs[job] then return end
  job.fetched = now()
  local b, err = self.retrieve(job.id)
  if not self.jobs[job] then return end
  if b then seen(self, job, b) else settle(self, job, nil, err) end
end

-- the due jobs by id (a job waited on twice is asked for once)
local function by_id(due)
  local ids = {}
  for _, job in ipairs(due) do
    local list = ids[job.id]
    if not list then list = {} ids[job.id] = list end
    list[#list + 1] = job
  end
  return ids
end

--- One list call from the budget; every watched batch it shows is brought
-- up to date (not only the due ones).
-- @tparam table params the list's query
-- @treturn ?table the page, or nil when it failed
function Watch:page(params)
  if not self:take() then return nil end
  local page = self.list(params)
  if not page or type(page.data) ~= "table" then return nil end
  for _, b in ipairs(page.data) do
    local same = type(b) == "table" and self.ids[b.id]
    if same then
      local jobs = {}
      for job in pairs(same) do jobs[#jobs + 1] = job end
      for _, job in ipairs(jobs) do
        if self.jobs[job] then seen(self, job, b) end
      end
    end
    self.loop:pause()                    -- a host's step stays short
  end
  return page
end

--- One round for the due waits: list pages, newest first, until each is
-- seen or the pages are older than the oldest of them; the rest by
-- retrieve.
-- @tparam table due the due waits
function Watch:list_round(due)
  self.round = now()
  local want = by_id(due)
  local left, oldest = 0, math.huge
  for _, job in ipairs(due) do oldest = math.min(oldest, job.created_at or -math.huge) end
  for _ in pairs(want) do left = left + 1 end
  local function mark(page)
    for _, b in ipairs(page.data) do
      if type(b) == "table" and want[b.id] then want[b.id] = nil left = left - 1 end
    end
  end
  -- DashScope filters by input file: a few due batches in one call
  if self.dialect == "dashscope" and left <= BY_FILE_MAX then
    local files = {}
    for _, jobs in pairs(want) do
      if not jobs[1].input_file_id then files = nil break end
      files[#files + 1] = jobs[1].input_file_id
    end
    if files then
      local page = self:page({ input_file_ids = files, limit = 100 })
      if page then mark(page) end
    end
  end
  -- a host that steps the loop from its frames gets pages of 20: a page
  -- of 50 batches costs about 0.7 ms to decode and normalise (Lua 5.4),
  -- which one step then pays, past its 0.5 ms budget
  local after, pages, limit = nil, 0, self.loop.deadline and 20 or 100
  while left > 0 and pages < 200 do
    local page = self:page({ limit = limit, after = after })
    if not page then break end
    pages = pages + 1
    mark(page)
    local data, last = page.data, page.data[#page.data]
    if not page.has_more or #data == 0 or type(last) ~= "table" or not last.id or last.id == after then break end
    if tonumber(last.created_at) and tonumber(last.created_at) < oldest then break end
    after = last.id
  end
  for _, jobs in pairs(want) do
    for _, job in ipairs(jobs) do
      if self.jobs[job] and job.due <= now() then retrieve(self, job) end
    end
  end
end

--- The poller's task: while anything is watched, poll what is due;
-- should it fail, every wait ends with its error.
function Watch:run()
  local ok, raised = pcall(self.poll, self)
  self.poller = nil
  if not ok then
    local err = errors.is(raised) and raised or errors.new({ kind = "task", code = "watch_failed",
      message = "the poller failed: " .. tostring(raised) })
    for job in pairs(self.jobs) do settle(self, job, nil, err) end
  end
end

--- The poller's loop (see `run`).
function Watch:poll()
  self.round = nil
  while self.count > 0 do
    local t, due, next_due = now(), {}, math.huge
    expire(self)
    for job in pairs(self.jobs) do
      if job.due <= t then due[#due + 1] = job
      else next_due = math.min(next_due, job.due, job.stop or math.huge) end
    end
    if #due == 0 then
      self.loop:nap(math.max(0.001, math.min(next_due - t, IDLE)))
    elseif #due >= LIST_FROM then
      self:list_round(due)
      self.round = nil
    else
      for _, job in ipairs(due) do
        if self.jobs[job] and job.due <= now() then retrieve(self, job) end
      end
    end
  end
end

--- A notice about a batch: the waits on it are due now, and the poller
-- wakes to fetch it from the service (what the notice said is never
-- taken: a forged one costs one status call, within the budget). A
-- batch not watched is remembered, so a wait that begins after its
-- notice asks at once.
-- @tparam string id the batch id
-- @treturn boolean true when a wait on it was woken
function Watch:hint(id)
  if type(id) ~= "string" then return false end
  self.hints = self.hints + 1
  local same = self.ids[id]
  if not same then
    if not self.hinted[id] then
      if self.nhinted >= HINTED_MAX then self.hinted, self.nhinted = {}, 0 end
      self.nhinted = self.nhinted + 1
    end
    self.hinted[id] = true
    return false
  end
  local t = now()
  for job in pairs(same) do
    -- a flood of notices for one batch: one fetch per HINT_GAP
    job.due = math.min(job.due, math.max(t, (job.fetched or -math.huge) + HINT_GAP))
  end
  if type(self.poller) == "table" then self.loop:rouse(self.poller) end
  return true
end

--- Say that notices come (`client:expect_notices`): a wait then asks
-- first after its interval, not at once, unless its batch was told of
-- already; polling is the fallback for a notice lost.
-- @tparam boolean on
function Watch:expect(on) self.told = on and true or false end

--- Wait for a batch to be final (as `client:wait`, whose options `o` are).
-- @tparam string id
-- @tparam table o checked options: interval, factor, max_interval,
-- jitter, deadline, on_progress
-- @treturn table the final batch, or nil and an error
function Watch:wait(id, o)
  local first = now()
  if self.told and not self.hinted[id] then first = first + o.interval end
  -- told of its end: polling is the fallback, at the wait's interval
  local interval = self.told and o.interval or math.min(o.interval, FIRST)
  local job = { id = id, o = o, watch = self, interval = interval, due = first,
                stop = o.deadline and now() + o.deadline }
  self.jobs[job] = true
  self.count = self.count + 1
  local same = self.ids[id] or {}
  same[job] = true
  self.ids[id] = same
  if not self.poller then               -- spawned from the loop's own turn (see Loop:defer)
    self.poller = true
    self.loop:defer(function() self.poller = self.loop:spawn(self.run, self) end)
  end
  local b, err
  if job.result then b, err = job.result[1], job.result[2]
  else b, err = self.loop:await(register, job) end
  local raised = errors.thrown(err)
  if raised ~= nil then error(raised, 0) end
  return b, err
end

return M
