--- Tasks, timers and the core's transfers in one loop.
--
-- Inside a task (a coroutine started by spawn) an operation yields until
-- its transfer is done, so tasks overlap. Outside any task it waits: by
-- driving the loop itself (plain Lua), or the host's way when the client
-- was made with a `host` (see below). `drive(false, budget)` never waits.
--
-- The host seam. A host that runs lbatch from its own scheduler (OpenResty,
-- a GUI toolkit, a game engine) drives the loop with `client:step()`,
-- waits on `client:pollfd()` / `client:timeout()` (or `client:pollable()`),
-- and passes `host = { waiter = ..., notify = ... }` to `lbatch.new`:
--
--    waiter()  -> { wait = fn(), wake = fn() }: how a caller outside
--                 lbatch's tasks blocks (`wait`, called until its result is
--                 in) and is woken (`wake`, called when it may be)
--    notify()  -> new work was queued from outside the loop (a task
--                 spawned, an operation called): the host should step soon
--
-- Nothing else of the loop is public; `lbatch.openresty` uses only this.
-- @module lbatch.impl.transport.loop
local core = require "lbatch.core"
local errors = require "lbatch.impl.transport.errors"

local now = core.now
local co_create, co_resume, co_running, co_status, co_yield =
  coroutine.create, coroutine.resume, coroutine.running, coroutine.status, coroutine.yield

local AWAIT = {}        -- what a task yields when it waits for the loop
local unpack = table.unpack or unpack
local function pack(...) return { n = select("#", ...), ... } end

local PROGRESS_EVERY = 0.1   -- seconds between progress calls for a transfer
local IDLE_MS = 1000         -- the longest wait in drive() when nothing is due

local Loop = {}
Loop.__index = Loop

--- Why this Lua cannot run lbatch's client, or nil. Plain Lua 5.1 cannot
-- yield across pcall, which the tasks do (the watcher, the pipeline, the
-- flow), and its assert takes no error object; LuaJIT can, 5.2 on can.
-- `lbatch.new`, `lbatch.scheduler` and the command refuse with it.
Loop.UNSUPPORTED = _VERSION == "Lua 5.1" and not rawget(_G, "jit") and
  "lbatch needs Lua 5.2 to 5.4 or LuaJIT 2.1: plain Lua 5.1 cannot yield across pcall and its assert"
  .. " shows no error object (the pure modules, lbatch.csv, lbatch.jsonl, lbatch.rules, ..., work on 5.1)" or nil

local Task = {}
Task.__index = Task

function Loop.new(opts)
  local host = opts.host or {}
  return setmetatable({
    ctl = core.new({ max_connections = opts.max_connections, max_streams = opts.max_streams }),
    tasks = {},          -- coroutine -> task
    alive = 0,
    waiting = {},        -- transfer id -> task or box
    watch = {},          -- transfer id -> progress watcher
    watched = 0,
    ready = {},          -- tasks to resume, in order
    heap = {},           -- timers: {at, seq, task|box}
    seq = 0,
    failures = {},       -- errors of tasks nobody joined, not yet reported
    after = {},          -- functions run at the end of every turn (see drive)
    deferred = {},       -- functions run once at the start of the next turn
    waiter = host.waiter,
    notify = host.notify or function() end,
  }, Loop)
end

-- ------------------------------------------------------------ timers

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

-- ------------------------------------------------------------ tasks

function Loop:current()
  local co = co_running()
  return co and self.tasks[co]
end

-- a task's body: fn(...), in a Lua function (fn may be a C function, which
-- coroutine.create refuses), one for every task: a closure per task would
-- end the LuaJIT trace of the code that spawns (a pipeline's workers)
local function body(fn, ...) return fn(...) end

function Loop:spawn(fn, ...)
  if type(fn) ~= "function" then errors.arg("spawn", "a function is expected") end
  local task = setmetatable({ loop = self, args = pack(fn, ...), status = "ready", joiners = {} }, Task)
  task.co = co_create(body)
  self.tasks[task.co] = task
  self.alive = self.alive + 1
  self.ready[#self.ready + 1] = task
  self.notify()
  return task
end

-- What a task raised, as an error object that carries the traceback: the
-- object itself when it was one (assert(nil, err) raises err), else a
-- `task` error with the raised value's text.
local function task_error(co, raised)
  local tb = debug.traceback(co, tostring(raised))
  if errors.is(raised) then
    raised.traceback = tb
    return raised
  end
  return errors.new({ kind = "task", code = "task_failed", message = tostring(raised), traceback = tb,
                      value = raised })
end

local function finish(self, task, ok, ...)
  self.tasks[task.co] = nil
  self.alive = self.alive - 1
  if ok then
    task.status = "done"
    task.results = pack(...)
  else
    task.status = "error"
    task.error = task_error(task.co, (...))
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

-- Wake a waiter (task or box) with a value.
function Loop:wake(w, ...)
  if w.co then
    w.wakeup = pack(...)
    self.ready[#self.ready + 1] = w
  else
    w.value = pack(...)
    if w.waiter then w.waiter.wake() end
  end
end

-- Wait, as the current task or, outside tasks, the host's way or by
-- driving the loop, until `register(self, waiter, a, b)` arranges for
-- self:wake(waiter, ...) to be called. A register that leaves work behind
-- should the waiting task be cancelled (a transfer, a watched batch) sets
-- `waiter.undo = fn` and `waiter.undo_arg`: Task:cancel calls
-- fn(loop, undo_arg). (Functions and arguments, not closures: the hot
-- paths then make no closure, which LuaJIT cannot compile.)
function Loop:await(register, a, b)
  local task = self:current()
  if task then
    task.wakeup = nil
    register(self, task, a, b)
    co_yield(AWAIT)
    local v = task.wakeup
    task.wakeup, task.undo, task.undo_arg = nil, nil, nil
    return unpack(v, 1, v.n)
  end
  local box = {}
  if self.waiter then
    local w = self.waiter()
    box.waiter = w
    register(self, box, a, b)
    self.notify()
    while not box.value do w.wait() end
  else
    register(self, box, a, b)
    while not box.value do self:drive(true) end
  end
  return unpack(box.value, 1, box.value.n)
end

-- a cancelled task's transfer: stopped, and nobody waits for it
local function drop_transfer(self, id)
  self.ctl:cancel(id)
  self.waiting[id] = nil
  if self.watch[id] then
    self.watch[id] = nil
    self.watched = self.watched - 1
  end
end

local function wait_transfer(self, w, id)
  self.waiting[id] = w
  w.undo, w.undo_arg = drop_transfer, id
end

-- transfer(spec[, on_progress]): the core's result table; or nil, kind,
-- message when a local file made it fail before any request.
-- on_progress(up, up_total, down, down_total) runs from the loop's turn,
-- at most every 0.1 s while bytes move, and once at the end.
function Loop:transfer(spec, on_progress)
  local id, kind, message = self.ctl:add(spec)
  if not id then return nil, kind, message end
  if on_progress then
    self.watch[id] = { fn = on_progress, at = 0 }     -- a first report at once
    self.watched = self.watched + 1
  end
  return self:await(wait_transfer, id)
end

local function add_timer(self, w, seconds, undo)
  self.seq = self.seq + 1
  heap_push(self.heap, { at = now() + math.max(0, seconds), seq = self.seq, w = w })
  if undo then w.undo, w.undo_arg = undo[1], undo[2] end
end

-- sleep(seconds[, undo, arg]): with undo, a cancel during the sleep calls
-- undo(loop, arg) (the transport removes a kept temp file so)
function Loop:sleep(seconds, undo, arg)
  if type(seconds) ~= "number" or seconds ~= seconds then errors.arg("sleep", "seconds must be a number") end
  return self:await(add_timer, seconds, undo and { undo, arg })
end

-- nap(seconds): a sleep in a task that rouse(task) ends early (the
-- watcher's poller naps so, and a notice wakes it). Its timer stays in
-- the heap and, fired late, finds the nap over: a no-op.
local function nap_timer(self, task, seconds, token)
  add_timer(self, token, seconds)
  task.nap = token
end

function Loop:nap(seconds)
  local task = self:current()
  if not task then return self:sleep(seconds) end
  local token = {}
  token.waiter = { wake = function()
    if task.nap == token then task.nap = nil self:wake(task, true) end
  end }
  return self:await(nap_timer, seconds, token)
end

-- rouse(task): end the task's nap now, from anywhere (a request handler)
function Loop:rouse(task)
  if task and task.nap then
    task.nap = nil
    self:wake(task, false)
    self.notify()
  end
end

-- ------------------------------------------------------------ driving

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
  if #self.ready > 0 or #self.deferred > 0 then return 0 end
  local ms = IDLE_MS
  local top = self.heap[1]
  if top then ms = math.min(ms, math.max(0, (top.at - now()) * 1000)) end
  if self.watched > 0 then ms = math.min(ms, PROGRESS_EVERY * 1000) end
  return ms
end

-- Run a user callback from the loop's turn; its failure is reported like
-- a task's (run() and step() return it).
function Loop:callback(fn, ...)
  local args = pack(...)
  local ok, err = xpcall(function() return fn(unpack(args, 1, args.n)) end, function(e)
    if errors.is(e) then return e end
    return errors.new({ kind = "task", code = "callback_failed", message = tostring(e),
                        traceback = debug.traceback(tostring(e), 2), value = e })
  end)
  if not ok then self.failures[#self.failures + 1] = { error = err } end
end

function Loop:progress(w, u, ut, d, dt)
  local sig = u .. " " .. ut .. " " .. d .. " " .. dt
  if sig == w.last then return end
  w.last = sig
  self:callback(w.fn, u, ut, d, dt)
end

-- One turn: I/O (waiting up to the next timer when block), completions,
-- timers, then the ready tasks. With budget_ms, I/O stops after half of it
-- and tasks are resumed until it is spent; what is left waits for the next
-- turn (at least one socket and one task run in every turn).
function Loop:drive(block, budget_ms)
  local ctl = self.ctl
  local deadline = budget_ms and (now() + budget_ms / 1000)
  if #self.deferred > 0 then
    local list = self.deferred
    self.deferred = {}
    for _, fn in ipairs(list) do fn() end
    block = false
  end
  ctl:step(block and self:wait_ms() or 0, budget_ms and budget_ms / 2)
  if self.watched > 0 then
    local t = now()
    for id, w in pairs(self.watch) do
      if t >= w.at then
        w.at = t + PROGRESS_EVERY
        local u, ut, d, dt = ctl:progress(id)
        if u then self:progress(w, u, ut, d, dt) end
      end
    end
  end
  while true do
    local id, res = ctl:done()
    if not id then break end
    local watcher = self.watch[id]
    if watcher then
      self.watch[id] = nil
      self.watched = self.watched - 1
      if res.code == 0 and not res.fail then   -- the last report: all of it
        self:progress(watcher, res.sent, res.sent, res.received, res.received)
      end
    end
    local w = self.waiting[id]
    self.waiting[id] = nil
    if w then self:wake(w, res) end
  end
  local heap, t = self.heap, now()
  while heap[1] and heap[1].at <= t do self:wake(heap_pop(heap).w, true) end
  self:run_ready(deadline)
  -- Transfers added during this turn reach the network only in the next
  -- turn's ctl:step, so work done here (a journal write) precedes them.
  for _, fn in ipairs(self.after) do fn() end
end

-- defer(fn): fn runs once at the start of the next turn, from wherever the
-- loop is driven. A task that must outlive its caller is spawned there:
-- under ngx_lua a coroutine made in a request handler belongs to that
-- request, and resuming it from the driver's timer after the request ends
-- crashes the worker.
function Loop:defer(fn)
  self.deferred[#self.deferred + 1] = fn
  self.notify()
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
  return self.alive + self.ctl:pending() + #self.heap + #self.deferred
end

function Loop:timeout()
  if #self.ready > 0 or #self.deferred > 0 then return 0 end
  local ms = self.ctl:timeout()
  local top = self.heap[1]
  if top then
    local t = math.max(0, math.ceil((top.at - now()) * 1000))
    if ms < 0 or t < ms then ms = t end
  end
  if self.watched > 0 then
    local t = math.max(0, math.ceil(PROGRESS_EVERY * 1000))
    if ms < 0 or t < ms then ms = t end
  end
  return ms
end

-- the error of a failed task nobody joined (oldest first), or nil
function Loop:take_failure()
  local task = table.remove(self.failures, 1)
  if task then return task.error end
end

-- ------------------------------------------------------------ Task

--- Has the task finished (done, failed or cancelled)?
-- @treturn boolean
function Task:done() return self.status == "done" or self.status == "error" end

local function add_joiner(_, w, task) task.joiners[#task.joiners + 1] = w end

--- Wait for the task (yielding in a task, waiting outside).
-- @return its results, or nil and its error (an error object;
-- `err.traceback` says where it was raised)
function Task:join()
  if not self:done() then
    local loop = self.loop
    if loop:current() == self then errors.arg("join", "a task cannot join itself") end
    loop:await(add_joiner, self)
  end
  if self.status == "error" then
    return nil, self.error
  end
  return unpack(self.results, 1, self.results.n)
end

--- Stop a task that has not finished: what it waits on is undone (its
-- transfer stopped, its batch no longer polled for it).
-- @treturn boolean false when it had already finished
function Task:cancel()
  if self:done() then return false end
  local loop = self.loop
  local undo, arg = self.undo, self.undo_arg
  self.undo, self.undo_arg = nil, nil
  if undo then undo(loop, arg) end
  -- a timer it sleeps on stays in the heap: waking a finished task is a no-op
  loop.tasks[self.co] = nil
  loop.alive = loop.alive - 1
  self.status = "error"
  self.error = errors.new({ kind = "cancelled", code = "task_cancelled", message = "the task was cancelled" })
  for _, j in ipairs(self.joiners) do loop:wake(j) end
  self.joiners = {}
  return true
end

return Loop
