--- lbatch inside OpenResty (ngx_lua): never blocks the nginx worker.
--
--    local client = require("lbatch.openresty").client{ api_key = ..., base_url = ... }
--    -- in content_by_lua*, ngx.timer handlers, anywhere a yield is allowed:
--    local batch = assert(client:retrieve(id))
--
-- One client per worker (client() returns the same one for the same
-- options). It uses only the documented host seam (see `lbatch.loop`): a
-- driver in an ngx.timer calls step() and sleeps with ngx.sleep while
-- transfers are active, and on a semaphore while idle (`notify` wakes it);
-- an operation called from a request or timer handler waits on an
-- ngx.semaphore (`waiter`), so the worker serves other requests meanwhile.
-- @module lbatch.openresty
local lbatch = require "lbatch"
local semaphore = require "ngx.semaphore"

local M = {}
local clients = {}

local POLL = 0.002       -- seconds between steps while transfers are active
local IDLE = 1           -- seconds the driver sleeps when there is no work

-- how a handler waits for its result: on a semaphore the loop posts
local function waiter()
  local sema = semaphore.new()
  return { wait = function() sema:wait(60) end, wake = function() sema:post(1) end }
end

local function start(opts)
  local idle, sleeping = semaphore.new(), false
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.host = {
    waiter = waiter,
    notify = function() if sleeping then idle:post(1) end end,
  }
  local client = lbatch.new(o)

  local function drive(premature)
    if premature then return end
    while not ngx.worker.exiting() do
      local pending = client:step(1)
      if pending == 0 then
        sleeping = true
        idle:wait(IDLE)
        sleeping = false
      else
        local ms = client:timeout()
        -- (at least 1 ms: ngx.sleep(0) needs a patch stock nginx lacks)
        ngx.sleep((ms >= 1 and ms < POLL * 1000) and ms / 1000 or ms < 1 and 0.001 or POLL)
      end
    end
  end
  assert(ngx.timer.at(0, drive))
  return client
end

--- This worker's client for these options (made on first use).
-- @tparam[opt] table opts as `lbatch.new` (`host` is set here)
-- @treturn lbatch.client
function M.client(opts)
  opts = opts or {}
  local key = (opts.base_url or "") .. "\0" .. (opts.region or "") .. "\0" .. (opts.api_key or "")
  local c = clients[key]
  if not c then
    c = start(opts)
    clients[key] = c
  end
  return c
end

return M
