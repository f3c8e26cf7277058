--- lbatch inside OpenResty (ngx_lua): never blocks the nginx worker.
--
--    local client = require("lbatch.openresty").client{ api_key = ..., base_url = ... }
--    -- in content_by_lua*, ngx.timer handlers, anywhere a yield is allowed:
--    local batch = assert(client:retrieve(id))
--
-- One scheduler per worker (`lbatch.scheduler`), shared by every client
-- made here: one driver, one multi handle, whatever the number of services
-- and keys; client() returns the same client for the same options. It
-- uses only the documented host seam (see `lbatch.loop`): the driver, in an
-- ngx.timer, calls step() and sleeps with ngx.sleep while transfers are
-- active, and on a semaphore while idle (`notify` wakes it); an operation
-- called from a request or timer handler waits on an ngx.semaphore
-- (`waiter`), so the worker serves other requests meanwhile.
-- @module lbatch.openresty
local lbatch = require "lbatch"
local semaphore = require "ngx.semaphore"

local M = {}
local clients = {}
local sched

local POLL = 0.002       -- seconds between steps while transfers are active
local IDLE = 1           -- seconds the driver sleeps when there is no work

-- how a handler waits for its result: on a semaphore the loop posts
local function waiter()
  local sema = semaphore.new()
  return { wait = function() sema:wait(60) end, wake = function() sema:post(1) end }
end

--- This worker's scheduler (made, with its driver, on first use).
-- @tparam[opt] table opts max_connections, max_streams: taken when it is made
-- @treturn lbatch.scheduler
function M.scheduler(opts)
  if sched then return sched end
  local idle, sleeping = semaphore.new(), false
  opts = opts or {}
  sched = lbatch.scheduler({ max_connections = opts.max_connections, max_streams = opts.max_streams, host = {
    waiter = waiter,
    notify = function() if sleeping then idle:post(1) end end,
  } })
  local s = sched
  local function drive(premature)
    if premature then return end
    while not ngx.worker.exiting() do
      local pending = s:step(1)
      if pending == 0 then
        sleeping = true
        idle:wait(IDLE)
        sleeping = false
      else
        local ms = s:timeout()
        -- (at least 1 ms: ngx.sleep(0) needs a patch stock nginx lacks)
        ngx.sleep((ms >= 1 and ms < POLL * 1000) and ms / 1000 or ms < 1 and 0.001 or POLL)
      end
    end
  end
  assert(ngx.timer.at(0, drive))
  return sched
end

--- This worker's client for these options (made on first use), on the
-- worker's scheduler.
-- @tparam[opt] table opts as `lbatch.new` (`scheduler` is set here;
-- max_connections and max_streams go to the scheduler when it is made)
-- @treturn lbatch.client, or nil and an error (no key found)
function M.client(opts)
  opts = opts or {}
  local key = (opts.base_url or "") .. "\0" .. (opts.region or "") .. "\0" .. (opts.api_key or "")
  local c = clients[key]
  if not c then
    local o = {}
    for k, v in pairs(opts) do o[k] = v end
    o.max_connections, o.max_streams = nil, nil
    o.scheduler = M.scheduler(opts)
    local err
    c, err = lbatch.new(o)
    if not c then return nil, err end
    clients[key] = c
  end
  return c
end

--- A content handler for a location that receives webhooks and
-- DashScope's callbacks: each delivery verified (`lbatch.notify`) and
-- handed to `client:notice`, so the waits in this worker wake.
--
--    location = /lbatch/notify { content_by_lua_block {
--      require("lbatch.openresty").notify_handler{ client = c, secrets = { "whsec_..." } }() } }
-- @tparam table o client (this worker's client to tell; default
-- `M.client(o.client_opts)`), and `lbatch.notify.new`'s options
-- @treturn function the handler: 200 for a notice, 400 refused, 405 not a POST
function M.notify_handler(o)
  local ho = {}
  for k, v in pairs(o) do ho[k] = v end
  ho.client = o.client or function() return assert(M.client(o.client_opts)) end
  ho.on_refused = function(err)
    ngx.log(ngx.WARN, "lbatch: a notice refused: ", tostring(err))
    if o.on_refused then o.on_refused(err) end
  end
  local handle = require("lbatch.notify").handler(ho)
  return function()
    local method = ngx.req.get_method()
    local body = ""
    if method == "POST" then
      ngx.req.read_body()
      body = ngx.req.get_body_data() or ""
    end
    return ngx.exit((handle(method, ngx.req.get_headers(100, true), body)))
  end
end

return M
