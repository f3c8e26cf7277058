-- lbatch.loop with no server: tasks, timers, joins, cancels and what a
-- cancel undoes, pause, deferred work and the turn-end hooks.
local Loop = require "lbatch.impl.transport.loop"
local now = require("lbatch.core").now

local function drain(loop)
  local turns = 0
  while loop:pending() > 0 do
    loop:drive(true)
    turns = turns + 1
    assert(turns < 10000, "the loop does not settle")
  end
end

describe("lbatch.impl.transport.loop", function()
  it("runs tasks in spawn order and resumes a sleeper no sooner than its time", function()
    local loop, seen = Loop.new({}), {}
    local t0 = now()
    loop:spawn(function() loop:sleep(0.05) seen[#seen + 1] = "late" end)
    loop:spawn(function() seen[#seen + 1] = "first" end)
    loop:spawn(function() loop:sleep(0.01) seen[#seen + 1] = "soon" end)
    drain(loop)
    assert.are.same({ "first", "soon", "late" }, seen)
    assert.is_true(now() - t0 >= 0.05)
  end)

  it("joins a task's results, and a raise as a task error with its traceback", function()
    local loop = Loop.new({})
    local ok = loop:spawn(function(a, b) loop:sleep(0) return a + b, "x", nil end, 2, 3)
    local bad = loop:spawn(function() error("boom") end)
    local out
    loop:spawn(function() out = { ok:join() } end)
    drain(loop)
    assert.are.same({ 5, "x" }, out)
    local v, err = bad:join()
    assert.is_nil(v)
    assert.are.equal("task", err.kind)
    assert.matches("boom", err.message)
    assert.matches("traceback", err.traceback)
    assert.are.equal(err, loop:take_failure())       -- nobody joined it while it ran
    assert.is_nil(loop:take_failure())
  end)

  it("keeps a raised error object as it is", function()
    local errors = require "lbatch.impl.transport.errors"
    local loop = Loop.new({})
    local e = errors.new({ kind = "http", status = 404, message = "no such batch" })
    local t = loop:spawn(function() error(e, 0) end)      -- as Lua's assert(nil, e) raises it
    drain(loop)
    local _, err = t:join()
    assert.are.equal(e, err)
    assert.is_string(err.traceback)
  end)

  it("cancels a sleeping task: its joiners wake with a cancelled error, its timer wakes nothing", function()
    local loop = Loop.new({})
    local ran_on = false
    local t = loop:spawn(function() loop:sleep(0.05) ran_on = true end)
    local joined
    loop:spawn(function() joined = { t:join() } end)
    loop:drive(false)
    assert.is_true(t:cancel())
    assert.is_false(t:cancel())                   -- already finished
    drain(loop)
    assert.is_false(ran_on)
    assert.is_nil(joined[1])
    assert.are.equal("cancelled", joined[2].kind)
  end)

  it("calls a waiter's undo once on cancel, and never after a normal wake", function()
    local loop = Loop.new({})
    local undone = {}
    local function undo(_, arg) undone[#undone + 1] = arg end
    local wakers = {}
    local function register(_, w, name) w.undo, w.undo_arg = undo, name wakers[name] = w end
    local a = loop:spawn(function() return loop:await(register, "a") end)
    local b = loop:spawn(function() return loop:await(register, "b") end)
    loop:drive(false)
    loop:wake(wakers.b, "value")
    loop:drive(false)
    assert.are.equal("value", (b:join()))
    assert.is_false(b:cancel())
    assert.is_true(a:cancel())
    assert.are.same({ "a" }, undone)
  end)

  it("calls a sleep's undo with its argument when the sleeper is cancelled (a kept temp file removed)", function()
    local loop = Loop.new({})
    local undone = {}
    local function undo(l, arg) undone[#undone + 1] = { l, arg } end
    local t = loop:spawn(function() return loop:sleep(0.2, undo, "/tmp/part-1") end)
    local quick = loop:spawn(function() return loop:sleep(0, undo, "/tmp/part-2") end)
    loop:drive(false)
    assert.is_true(t:cancel())
    drain(loop)
    assert.are.equal(1, #undone)
    assert.are.equal(loop, undone[1][1])
    assert.are.equal("/tmp/part-1", undone[1][2])
    assert.is_false(quick:cancel())                 -- woke normally: nothing to undo
    assert.are.equal(1, #undone)
  end)

  it("refuses a task joining itself", function()
    local loop = Loop.new({})
    local t
    t = loop:spawn(function() return pcall(t.join, t) end)
    drain(loop)
    local ok, msg = t:join()
    assert.is_false(ok)
    assert.matches("cannot join itself", msg)
  end)

  it("pauses long work only when a budgeted turn has spent its budget", function()
    local loop = Loop.new({})
    local count = 0
    loop:spawn(function()
      for _ = 1, 200 do
        local t = now() + 0.0002
        while now() < t do end
        count = count + 1
        loop:pause()
      end
    end)
    loop:drive(false, 1)                          -- a 1 ms turn: a few items, not all
    assert.is_true(count > 0 and count < 200, "items in one 1 ms turn: " .. count)
    drain(loop)                                   -- unbudgeted turns: pause returns at once
    assert.are.equal(200, count)
  end)

  it("runs deferred work at the start of the next turn and turn-end hooks after the tasks", function()
    local loop, seen = Loop.new({}), {}
    local remove = loop:at_turn_end(function() seen[#seen + 1] = "end" end)
    loop:defer(function() seen[#seen + 1] = "deferred" end)
    loop:spawn(function() seen[#seen + 1] = "task" end)
    assert.are.equal(0, loop:timeout())
    loop:drive(false)
    assert.are.same({ "deferred", "task", "end" }, seen)
    remove()
    loop:drive(false)
    assert.are.equal(3, #seen)
  end)

  it("says when it is next needed: a timer's ms, 0 with ready work", function()
    local loop = Loop.new({})
    loop:spawn(function() loop:sleep(0.2) end)
    assert.are.equal(0, loop:timeout())
    loop:drive(false)
    local ms = loop:timeout()
    assert.is_true(ms > 100 and ms <= 200, tostring(ms))
    assert.are.equal(2, loop:pending())           -- the task and its timer
  end)

  it("notifies the host when work is queued from outside", function()
    local n = 0
    local loop = Loop.new({ host = { notify = function() n = n + 1 end } })
    loop:spawn(function() end)
    loop:defer(function() end)
    assert.are.equal(2, n)
  end)
end)
