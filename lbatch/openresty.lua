-- lbatch inside OpenResty (ngx_lua): never blocks the nginx worker.
--
--   local client = require("lbatch.openresty").client{ api_key = ..., base_url = ... }
--   -- in content_by_lua*, ngx.timer handlers, anywhere a yield is allowed:
--   local batch = assert(client:retrieve(id))
--
-- One client per worker (client() returns the same one for the same
-- options). A driver runs in an ngx.timer: it calls step() and sleeps with
-- ngx.sleep while transfers are active, and on a semaphore while idle. An
-- operation called from a request or timer handler waits on an
-- ngx.semaphore, so the worker serves other requests meanwhile.
local lbatch = require "lbatch"
local semaphore = require "ngx.semaphore"

local M = {}
local clients = {}

local POLL = 0.002       -- seconds between steps while transfers are active

local function start(opts)
  local client = lbatch.new(opts)
  local loop = client.loop
  local idle = semaphore.new()
  local sleeping = false

  -- an operation outside lbatch's tasks: register it, wake the driver, and
  -- wait on a semaphore that the loop posts when the result is in
  loop.block = function(box, register)
    local sema = semaphore.new()
    box.notify = function() sema:post(1) end
    register(box)
    if sleeping then idle:post(1) end
    while not box.value do sema:wait(3600) end
  end

  local function drive(premature)
    if premature then return end
    while not ngx.worker.exiting() do
      local pending = client:step(1)
      if pending == 0 then
        sleeping = true
        idle:wait(1)
        sleeping = false
      else
        local ms = client:timeout()
        ngx.sleep((ms >= 0 and ms < POLL * 1000) and ms / 1000 or POLL)
      end
    end
  end
  assert(ngx.timer.at(0, drive))

  -- spawn from a handler: wake the driver too
  local spawn = client.spawn
  function client.spawn(self, fn, ...)
    local t = spawn(self, fn, ...)
    if sleeping then idle:post(1) end
    return t
  end
  return client
end

-- client(opts): this worker's client for these options
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
