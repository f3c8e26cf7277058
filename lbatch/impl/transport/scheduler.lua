--- The scheduler: one loop, one libcurl multi handle and one host seam for
-- any number of clients.
--
--    local sched = lbatch.scheduler()
--    local ds = lbatch.new{ region = "cn", scheduler = sched }
--    local oa = lbatch.new{ region = "openai", scheduler = sched }
--    sched:spawn(function() ... ds:wait(id) ... end)
--    sched:spawn(function() ... oa:upload(path) ... end)
--    assert(sched:run())
--
-- Clients on one scheduler share its transfers, its `max_connections` and
-- its `pollfd()`: a host waits on one descriptor whatever the number of
-- services, regions or keys. Each client keeps its own key, base URL,
-- retries and poll budget. A client made without `scheduler` gets one of
-- its own, and `client:spawn`, `client:run`, `client:step` and the rest
-- are shorthands for it.
--
-- The host seam: a host that runs lbatch from its own loop (OpenResty, a
-- GUI toolkit, a game engine) calls `step()` and waits on `pollfd()` /
-- `timeout()` (or hands `pollable()` to cqueues); with `host = {waiter =
-- ..., notify = ...}` (see `lbatch.loop`) an operation called outside a
-- task waits the host's way. `step()` never blocks.
-- @classmod lbatch.impl.transport.scheduler
local Loop = require "lbatch.impl.transport.loop"
local config = require "lbatch.impl.api.config"
local errors = require "lbatch.impl.transport.errors"

local check, argerr = errors.check, errors.arg

local Scheduler = {}
Scheduler.__index = Scheduler

local KNOWN = { host = true, max_connections = true, max_streams = true }

local options = errors.protect(function(opts)
  for k in pairs(opts) do
    if not KNOWN[k] then errors.throw(("unknown option %s"):format(tostring(k))) end
  end
  return { host = config.host(opts.host),
           max_connections = config.number(opts, "max_connections", true),
           max_streams = config.number(opts, "max_streams", true) }
end)

--- Make a scheduler.
-- @tparam[opt] table opts max_connections (16: connections at once, and
-- transfers at once on HTTP/1.1), max_streams (100: transfers on one
-- HTTP/2 connection), host (see `lbatch.loop`). Raises when an option is
-- wrong or unknown.
-- @treturn lbatch.scheduler
function Scheduler.new(opts)
  check("scheduler", "opts", opts, "table", true)
  local o, why = options(opts or {})
  if not o then argerr("scheduler", why) end
  return setmetatable({ loop = Loop.new(o) }, Scheduler)
end

--- Is `x` a scheduler?
-- @param x anything
-- @treturn boolean
function Scheduler.is(x) return getmetatable(x) == Scheduler end

--- Start a task: `fn(...)` in a coroutine whose operations overlap with
-- every other task's, on every client of this scheduler.
-- @tparam function fn
-- @param ... its arguments
-- @treturn table the task: `task:done()`, `task:join()` (its results, or
-- nil and its error, with `err.traceback`), `task:cancel()`
function Scheduler:spawn(fn, ...) return self.loop:spawn(fn, ...) end

--- Sleep: in a task, without blocking the others.
-- @tparam number seconds
function Scheduler:sleep(seconds) return self.loop:sleep(seconds) end

--- In a task's long work (building requests, reading results), let a
-- host's step() return once its budget is spent; the work goes on at the
-- next step. Under run() or outside a task it returns at once.
function Scheduler:pause() return self.loop:pause() end

--- Run `fn` at the end of every loop turn, after the tasks ran and before
-- any request they queued goes out (the pipeline writes its journal so).
-- @tparam function fn
-- @treturn function a remover
function Scheduler:at_turn_end(fn)
  check("at_turn_end", "fn", fn, "function")
  return self.loop:at_turn_end(fn)
end

--- Drive the loop until every task is done.
-- @treturn true, or nil and the error of a task that failed (with `err.traceback`)
function Scheduler:run()
  local loop = self.loop
  if loop:current() then argerr("run", "cannot be called from inside a task") end
  while true do
    local err = loop:take_failure()
    if err then return nil, err end
    if loop.alive == 0 then return true end
    loop:drive(true)
  end
end

--- Do what is ready, never wait: for hosts with their own loop.
-- Sockets are handed to libcurl for up to half the budget, tasks are
-- resumed until it is spent, and the rest waits for the next step
-- (timeout() is then 0).
-- @tparam[opt=0.5] number budget_ms
-- @treturn integer the work still pending (tasks, transfers, timers)
-- @treturn ?table the error of a task that failed, when one did
function Scheduler:step(budget_ms)
  check("step", "budget_ms", budget_ms, "number", true)
  local loop = self.loop
  loop:drive(false, budget_ms or 0.5)
  return loop:pending(), loop:take_failure()
end

--- Milliseconds until step() is next needed: 0 now, -1 only socket
-- activity (see pollfd).
-- @treturn integer
function Scheduler:timeout() return self.loop:timeout() end

--- One descriptor (an epoll set on Linux) readable when a transfer of any
-- client has work, for luv, poll(2) and the like.
-- @treturn integer
function Scheduler:pollfd() return self.loop.ctl:pollfd() end

--- The scheduler in cqueues' pollable protocol: `pollfd()`, `events()`
-- (`"r"`) and `timeout()` in seconds (nil: none).
-- @treturn table
function Scheduler:pollable()
  local sched = self
  return {
    pollfd = function() return sched:pollfd() end,
    events = function() return "r" end,
    timeout = function()
      local ms = sched:timeout()
      if ms >= 0 then return ms / 1000 end
    end,
  }
end

--- Close the scheduler: every transfer of every client stops.
function Scheduler:close() self.loop.ctl:close() end

return Scheduler
