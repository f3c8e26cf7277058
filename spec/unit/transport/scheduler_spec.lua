-- lbatch.scheduler with no server: options, the shorthands a client keeps,
-- run and step, the host seam's timeout, pollfd and pollable.
local lbatch = require "lbatch"

describe("lbatch.impl.transport.scheduler", function()
  it("takes max_connections, max_streams and host, and refuses anything else", function()
    assert.is_truthy(lbatch.scheduler({ max_connections = 2, max_streams = 10, host = {} }))
    assert.is_truthy(lbatch.scheduler())
    assert.has_error(function() lbatch.scheduler({ max_connections = 0 }) end)
    assert.has_error(function() lbatch.scheduler({ max_connections = 1.5 }) end)
    assert.has_error(function() lbatch.scheduler({ host = { notify = 1 } }) end)
    assert.has_error(function() lbatch.scheduler({ base_url = "http://127.0.0.1:1" }) end)
    assert.has_error(function() lbatch.scheduler("x") end)
  end)

  it("runs every task of every client on it, and returns the first failure", function()
    local sched = lbatch.scheduler()
    local a = assert(lbatch.new({ api_key = "key-a", base_url = "http://127.0.0.1:9", scheduler = sched }))
    local b = assert(lbatch.new({ api_key = "key-b", base_url = "http://127.0.0.1:9", scheduler = sched }))
    local seen = {}
    a:spawn(function() a:sleep(0.02) seen[#seen + 1] = "a" end)
    b:spawn(function() seen[#seen + 1] = "b" end)
    assert.is_true(sched:run())
    assert.are.same({ "b", "a" }, seen)
    sched:spawn(function() error("bad task") end)
    local ok, err = a:run()                         -- a client's run is its scheduler's
    assert.is_nil(ok)
    assert.matches("bad task", err.message)
    local inner = sched:spawn(function() return pcall(sched.run, sched) end)
    assert.is_true(sched:run())
    local okr, msg = inner:join()
    assert.is_false(okr)
    assert.matches("cannot be called from inside a task", msg)
  end)

  it("steps without waiting, and counts what is pending", function()
    local sched = lbatch.scheduler()
    sched:spawn(function() sched:sleep(0.5) end)
    local t0 = require("lbatch.core").now()
    local pending = sched:step()
    assert.is_true(require("lbatch.core").now() - t0 < 0.1)
    assert.are.equal(2, pending)                    -- the task and its timer
    local ms = sched:timeout()
    assert.is_true(ms > 400 and ms <= 500, tostring(ms))
    local p = sched:pollable()
    assert.are.equal(sched:pollfd(), p.pollfd())
    assert.are.equal("r", p.events())
    assert.is_true(p.timeout() > 0.4 and p.timeout() <= 0.5)
    assert.has_error(function() sched:step("soon") end)
    sched:close()
  end)

  it("gives each client without one a scheduler of its own", function()
    local a = assert(lbatch.new({ api_key = "key-a", base_url = "http://127.0.0.1:9" }))
    local b = assert(lbatch.new({ api_key = "key-b", base_url = "http://127.0.0.1:9" }))
    assert.are_not.equal(a.scheduler, b.scheduler)
    assert.are_not.equal(a:pollfd(), b:pollfd())
    a:close() b:close()
  end)

  it("closing a client on a shared scheduler leaves the scheduler and the other clients running", function()
    local sched = lbatch.scheduler()
    local a = assert(lbatch.new({ api_key = "key-a", base_url = "http://127.0.0.1:9", scheduler = sched }))
    local b = assert(lbatch.new({ api_key = "key-b", base_url = "http://127.0.0.1:9", scheduler = sched }))
    a:close()
    assert.has_error(function() a:retrieve("batch_1") end)   -- a closed client is a programming error
    local ran = false
    b:spawn(function() ran = true end)
    assert.is_true(sched:run())
    assert.is_true(ran)
    sched:close()
  end)

  it("returns nil, err (kind config) when no key is found", function()
    local old = { os.getenv("DASHSCOPE_API_KEY"), os.getenv("OPENAI_API_KEY") }
    if old[1] or old[2] then pending("a key is set in this environment") return end
    local c, err = lbatch.new({ base_url = "http://127.0.0.1:9" })
    assert.is_nil(c)
    assert.are.equal("config", err.kind)
    assert.are.equal("no_api_key", err.code)
    assert.matches("no API key", tostring(err))
  end)
end)
