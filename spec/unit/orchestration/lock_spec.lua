-- lbatch.lock: one owner per work directory (no server, no nginx). The
-- commands and the pipeline holding it are in integration/orchestration/lock_spec.
local H = require "helper"
local lock = require "lbatch.impl.orchestration.lock"
local core = require "lbatch.core"

describe("lock.acquire", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rm_rf(dir) end)

  it("takes a free directory's lock; a second owner fails at once, naming the holder and how to wait", function()
    local lk = assert(lock.acquire(dir))
    local t0 = core.now()
    local none, err = lock.acquire(dir)
    assert.is_true(core.now() - t0 < 0.2)
    assert.is_nil(none)
    assert.are.same({ "busy", "dir_locked", "dir", dir .. "/lock" }, { err.kind, err.code, err.param, err.path })
    assert.are.equal(H.pid, err.holder.pid)
    assert.matches(("^lbatch: busy dir_locked: %s is in use by pid %d on "):format(dir, H.pid):gsub("%-", "%%-"),
      tostring(err))
    assert.matches("stopped at once, nothing was sent", err.message, 1, true)
    assert.matches("--wait-lock SECONDS (library: wait_lock = seconds)", err.message, 1, true)
    lk:release()
    assert(lock.acquire(dir)):release()
  end)

  it("waits for the holder through the sleep it is given, up to `wait` seconds", function()
    local held = assert(lock.acquire(dir))
    local naps = {}
    local lk = assert(lock.acquire(dir, { wait = 10, sleep = function(s)
      naps[#naps + 1] = s
      if #naps == 3 then held:release() end
      core.sleep(s)
    end }))
    assert.are.equal(3, #naps)
    for _, s in ipairs(naps) do assert.is_true(s > 0 and s <= lock.POLL) end
    lk:release()
    held = assert(lock.acquire(dir))
    local none, err = lock.acquire(dir, { wait = 0.3 })
    assert.is_nil(none)
    assert.matches("stopped after waiting 0.3s", err.message, 1, true)
    held:release()
  end)

  it("a lock file with no holder written yet: the error says so rather than naming nobody", function()
    local held = assert(core.lock(dir .. "/lock"))
    H.write(dir .. "/lock", "")                      -- as between the holder's lock and its write
    local t0 = core.now()
    local none, err = lock.acquire(dir)
    assert.is_nil(none)
    assert.is_true(core.now() - t0 >= lock.NAMED)      -- it gave the holder a moment to write its name
    assert.matches("in use by another process (it has not written its name yet)", err.message, 1, true)
    held:release()
  end)

  it("a directory that cannot hold the lock is an io error; a wrong wait is a programming error", function()
    local none, err = lock.acquire(dir .. "/missing")
    assert.is_nil(none)
    assert.are.same({ "io", dir .. "/missing/lock" }, { err.kind, err.path })
    assert.matches("^cannot lock .*: No such file or directory$", err.message)
    assert.has_error(function() lock.acquire(dir, { wait = -1 }) end)
    assert.has_error(function() lock.acquire(dir, { wait = "soon" }) end)
  end)
end)
