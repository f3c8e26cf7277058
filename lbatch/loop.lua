-- Tasks, timers and the core's transfers in one loop.
--
-- Inside a task (a coroutine started by spawn) an operation yields until its
-- transfer is done, so tasks overlap. Outside any task it drives the loop
-- (all tasks included) until its own transfer is done. step() never waits.
local core = require "lbatch.core"
local errors = require "lbatch.errors"

local now = core.now
local co_create, co_resume, co_running, co_status, co_yield =
  coroutine.create, coroutine.resume, coroutine.running, coroutine.status, coroutine.yield

local AWAIT = {}        -- what a task yields when it waits for the loop
local unpack = table.unpack or unpack
local function pack(...) return { n = select("#", ...), ... } end

local Loop = {}
Loop.__index = Loop

local Task = {}
Task.__index = Task

function Loop.new(opts)
  return setmetatable({
    ctl = core.new({ max_connections = opts.max_connections }),
    tasks = {},          -- coroutine -> task
    alive = 0,
    waiting = {},        -- transfer id -> task or box
    ready = {},          -- tasks to resume, in order
    heap = {},           -- timers: {at, seq, task|box}
    seq = 0,
    failures = {},       -- tasks that ended in error, not yet reported
    idle_wait = opts.idle_wait or 1000,
    after = {},          -- functions run at the end of every turn (see drive)
  }, Loop)
end

------------------------------------------------------------------ timers

local function heap_push(h, t)
  h[#h + 1] = t
  local i = #h
  while i > 1 do
    local p = math.floor(i / 2)
    local a, b = h[p], h[i]
    if a.at < b.at or (a.at == b.at and a.seq < b.seq) then break end
    h[p], h[i] = b, a
    i = p
  end
end

local function heap_pop(h)
  local n = #h
  local top, last = h[1], h[n]
  h[n] = nil
  n = n - 1
  if n == 0 then return top end
  h[1] = last
  local i = 1
  while true do
    local l, r, m = 2 * i, 2 * i + 1, i
    if l <= n and (h[l].at < h[m].at or (h[l].at == h[m].at and h[l].seq < h[m].seq)) then m = l end
    if r <= n and (h[r].at < h[m].at or (h[r].at == h[m].at and h[r].seq < h[m].seq)) then m = r end
    if m == i then break end
    h[i], h[m] = h[m], h[i]
    i = m
  end
  return top
end

------------------------------------------------------------------ tasks

function Loop:current()
  local co = co_running()
  return co and self.tasks[co]
end

function Loop:spawn(fn, ...)
  if type(fn) ~= "function" then error("spawn: a function is expected", 3) end
  local task = setmetatable({ loop = self, args = pack(...), status = "ready", joiners = {} }, Task)
  task.co = co_create(function(...) return fn(...) end)   -- (fn may be a C function)
  self.tasks[task.co] = task
  self.alive = self.alive + 1
  self.ready[#self.ready + 1] = task
  return task
end

local function finish(self, task, ok, ...)
  self.tasks[task.co] = nil
  self.alive = self.alive - 1
  if ok then
    task.status = "done"
    task.results = pack(...)
  else
    task.status = "error"
    local err = ...
    task.error = err
    task.traceback = debug.traceback(task.co, tostring(err))
    if #task.joiners == 0 then self.failures[#self.failures + 1] = task end
  end
  for _, j in ipairs(task.joiners) do self:wake(j) end
  task.joiners = {}
end

function Loop:resume(task, ...)
  if task.status == "ready" then
    task.status = "running"
    local a = task.args
    task.args = nil
    return self:resume(task, unpack(a, 1, a.n))
  end
  local co = task.co
  local r = pack(co_resume(co, ...))
  if co_status(co) == "dead" then
    return finish(self, task, unpack(r, 1, r.n))
  end
  if r[2] ~= AWAIT then    -- a plain coroutine.yield(): run again next turn
    self.ready[#self.ready + 1] = task
  end
end

-- Wake a waiter (task or box) with a value. A box may carry notify, set
-- by a host's block strategy (see lbatch.openresty).
function Loop:wake(w, ...)
  if w.co then
    w.wakeup = pack(...)
    self.ready[#self.ready + 1] = w
  else
    w.value = pack(...)
    if w.notify then w.notify() end
  end
end

-- Wait, as the current task or, outside tasks, by driving the loop, until
-- `register(self, waiter, a, b)` arranges for self:wake(waiter, ...) to be
-- called. (Functions and arguments, not closures: the hot paths then make
-- no closure, which LuaJIT cannot compile.)
function Loop:await(register, a, b)
  local task = self:current()
  if task then
    task.wakeup = nil
    register(self, task, a, b)
    co_yield(AWAIT)
    local v = task.wakeup
    task.wakeup = nil
    return unpack(v, 1, v.n)
  end
  local box = {}
  if self.block then                 -- a host's way to wait (e.g. a semaphore)
    self:block_on(box, register, a, b)
  else
    register(self, box, a, b)
    while not box.value do self:drive(true) end
  end
  return unpack(box.value, 1, box.value.n)
end

function Loop:block_on(box, register, a, b)
  self.block(box, function(w) register(self, w, a, b) end)
end

local function add_transfer(self, w, spec)
  local id = self.ctl:add(spec)
  self.waiting[id] = w
  w.transfer = id
end

function Loop:transfer(spec)
  return self:await(add_transfer, spec)
end

local function add_timer(self, w, seconds)
  self.seq = self.seq + 1
  heap_push(self.heap, { at = now() + math.max(0, seconds), seq = self.seq, w = w })
end

function Loop:sleep(seconds)
  if type(seconds) ~= "number" then error("sleep: seconds must be a number", 2) end
  return self:await(add_timer, seconds)
end

------------------------------------------------------------------ driving

-- Resume the tasks that are ready. With a deadline, stop once it has
-- passed and leave the rest, in order, for the next turn.
function Loop:run_ready(deadline)
  local ready = self.ready
  if #ready == 0 then return end
  self.ready = {}
  self.deadline = deadline
  for i, task in ipairs(ready) do
    if deadline and i > 1 and now() > deadline then
      local rest = {}
      for j = i, #ready do rest[#rest + 1] = ready[j] end
      for _, t in ipairs(self.ready) do rest[#rest + 1] = t end
      self.ready = rest
      break
    end
    if task.status == "ready" or task.status == "running" then self:resume(task) end
  end
  self.deadline = nil
end

-- pause(): for long work inside a task (writing shards): when this turn's
-- budget is spent (a host's step), let the turn end and go on at the next
-- one. Under run() or outside a task it returns at once.
function Loop:pause()
  local deadline = self.deadline
  if deadline and now() > deadline and self:current() then co_yield() end
end

-- ms until something is due, for the wait in drive()
function Loop:wait_ms()
  if #self.ready > 0 then return 0 end
  local ms = self.idle_wait
  local top = self.heap[1]
  if top then ms = math.min(ms, math.max(0, (top.at - now()) * 1000)) end
  return ms
end

-- One turn: I/O (waiting up to the next timer when block), completions,
-- timers, then the ready tasks. With budget_ms, I/O stops after half of it
-- and tasks are resumed until it is spent; what is left waits for the next
-- turn (at least one socket and one task run in every turn).
function Loop:drive(block, budget_ms)
  local ctl = self.ctl
  local deadline = budget_ms and (now() + budget_ms / 1000)
  ctl:step(block and self:wait_ms() or 0, budget_ms and budget_ms / 2)
  while true do
    local id, res = ctl:done()
    if not id then break end
    local w = self.waiting[id]
    self.waiting[id] = nil
    if w then
      w.transfer = nil
      self:wake(w, res)
    end
  end
  local heap, t = self.heap, now()
  while heap[1] and heap[1].at <= t do self:wake(heap_pop(heap).w, true) end
  self:run_ready(deadline)
  -- Transfers added during this turn reach the network only in the next
  -- turn's ctl:step, so work done here (a journal write) precedes them.
  for _, fn in ipairs(self.after) do fn() end
end

-- at_turn_end(fn) runs fn at the end of every turn; returns a remover
function Loop:at_turn_end(fn)
  local list = self.after
  list[#list + 1] = fn
  return function()
    for i, f in ipairs(list) do if f == fn then table.remove(list, i) return end end
  end
end

-- work still pending: live tasks, transfers in flight, timers set
function Loop:pending()
  return self.alive + self.ctl:pending() + #self.heap
end

function Loop:timeout()
  if #self.ready > 0 then return 0 end
  local ms = self.ctl:timeout()
  local top = self.heap[1]
  if top then
    local t = math.max(0, math.ceil((top.at - now()) * 1000))
    if ms < 0 or t < ms then ms = t end
  end
  return ms
end

function Loop:take_failure()
  local task = table.remove(self.failures, 1)
  if task then return task.traceback end
end

------------------------------------------------------------------ Task

function Task:done() return self.status == "done" or self.status == "error" end

local function add_joiner(_, w, task) task.joiners[#task.joiners + 1] = w end

-- join(): wait for the task, then its results, or nil, err
function Task:join()
  if not self:done() then
    local loop = self.loop
    if loop:current() == self then error("join: a task cannot join itself", 2) end
    loop:await(add_joiner, self)
  end
  if self.status == "error" then
    return nil, self.traceback
  end
  return unpack(self.results, 1, self.results.n)
end

-- cancel(): stop a task that has not finished; its transfer is abandoned.
function Task:cancel()
  if self:done() then return false end
  local loop = self.loop
  if self.transfer then
    loop.ctl:cancel(self.transfer)
    loop.waiting[self.transfer] = nil
  end
  -- a timer it sleeps on stays in the heap: waking a finished task is a no-op
  loop.tasks[self.co] = nil
  loop.alive = loop.alive - 1
  self.status = "error"
  self.error = errors.new({ kind = "cancelled", message = "task cancelled" })
  self.traceback = tostring(self.error)
  for _, j in ipairs(self.joiners) do loop:wake(j) end
  self.joiners = {}
  return true
end

return Loop
