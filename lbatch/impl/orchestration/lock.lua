--- One owner per work directory.
--
-- A run, a flow or an adopt holds an exclusive lock (flock) on `dir/lock`
-- for as long as it works there; the file names its holder (pid, host,
-- start time). The kernel frees the lock when its holder dies, however it
-- dies (kill -9 included): a lock file left behind blocks nobody. A second
-- owner fails at once with a `busy` error (code `dir_locked`) naming the
-- holder, or, given `wait`, waits up to that many seconds for it.
--
--    local lk, err = lock.acquire(dir, { wait = 60, sleep = function(s) client:sleep(s) end })
--    ...
--    return lk:release(result, err)     -- frees it, passes its arguments through
-- @module lbatch.impl.orchestration.lock
local core = require "lbatch.core"
local cjson = require "cjson"
local errors = require "lbatch.impl.transport.errors"

local M = {}

M.POLL = 0.2     -- seconds between tries while waiting
M.NAMED = 0.5    -- seconds a busy error waits for its holder's name

-- the holder as the lock file says it, in words
local function holder(text)
  local ok, h = pcall(cjson.decode, text or "")
  if not ok or type(h) ~= "table" or type(h.pid) ~= "number" then
    return "another process (it has not written its name yet)"
  end
  return ("pid %d on %s since %s"):format(h.pid, tostring(h.host), tostring(h.started)), h
end

local function busy(dir, path, text, waited)
  local who, h = holder(text)
  local after = waited and ("after waiting %gs"):format(waited) or "at once"
  return errors.new({ kind = "busy", code = "dir_locked", param = "dir", path = path, holder = h,
    message = ("%s is in use by %s (lock %s); stopped %s, nothing was sent. To wait for it: "
      .. "--wait-lock SECONDS (library: wait_lock = seconds)"):format(dir, who, path, after) })
end

--- Take the lock of a work directory (which must exist).
-- @tparam string dir the directory
-- @tparam ?table opts wait (seconds to wait for a holder to end; default 0:
-- fail at once), sleep (function(seconds): how to wait without blocking a
-- loop, e.g. `client:sleep`; default core.sleep)
-- @treturn userdata the lock (`:release(...)`), or nil and a `busy` or `io` error
function M.acquire(dir, opts)
  errors.check("lock.acquire", "dir", dir, "string")
  opts = opts or {}
  local wait = opts.wait or 0
  if type(wait) ~= "number" or wait ~= wait or wait < 0 then
    errors.arg("lock.acquire", "wait_lock must be a number of seconds >= 0", 3)
  end
  local sleep = opts.sleep or core.sleep
  local path = dir .. "/lock"
  local t0 = core.now()
  local deadline = t0 + wait
  while true do
    local lk, kind, text = core.lock(path)
    if lk then return lk end
    if kind ~= "busy" then return nil, errors.io("cannot lock", path, (text:gsub("^[^:]*: ", ""))) end
    -- a holder that has just taken the lock writes its name a moment later:
    -- the error waits up to NAMED seconds for it
    local t, named = core.now(), select(2, holder(text)) ~= nil
    if t >= deadline and (named or t >= t0 + M.NAMED) then
      return nil, busy(dir, path, text, wait > 0 and wait or nil)
    end
    sleep(t >= deadline and 0.01 or math.min(M.POLL, deadline - t))
  end
end

return M
