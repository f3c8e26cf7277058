--- lbatch's notices on a lua-http server (Debian's `lua-http`, on
-- cqueues): a stream handler that verifies each delivery and hands the
-- notice to the client, and `serve`, which runs a function beside such a
-- server on one cqueues controller.
--
--    local server = require("http.server").listen{ host = "127.0.0.1", port = 8080,
--      onstream = require("lbatch.lua_http").onstream{ client = client, secrets = { "whsec_..." } } }
--
-- Drive the client from the same cqueues controller (its `pollable()`, as
-- examples/cqueues.lua does): a notice wakes the wait in that process.
-- `serve` does both:
--
--    local report = assert(require("lbatch.lua_http").serve({ client = client,
--      listen = "127.0.0.1:8080", secrets = { "whsec_..." } }, pipeline.run, opts))
-- @module lbatch.lua_http
local notify = require "lbatch.notify"
local errors = require "lbatch.impl.transport.errors"

local M = {}

local STEP_MS = 5         -- a step's budget: the tasks' share of each wakeup

--- A lua-http `onstream` handler for webhook and callback deliveries.
-- @tparam table o client (the lbatch client to tell), and the options of
-- `lbatch.notify.new` (secrets, tolerance, max_body, ...), or notifier (a
-- receiver made already); on_notice(notice) and on_refused(err): called
-- for each delivery, if given
-- @treturn function onstream(server, stream): answers 200 to a notice,
-- 400 to a refused delivery, 405 to what is not a POST
function M.onstream(o)
  local handle, n = notify.handler(o)
  return function(_, stream)
    local req = stream:get_headers()
    local method = req:get(":method")
    local body = method == "POST" and stream:get_body_chars(n.max_body + 1, 10) or ""
    local headers = {}
    for name, value in req:each() do
      if name:sub(1, 1) ~= ":" then
        if headers[name] and headers[name] ~= value then headers[name] = { headers[name], value }
        else headers[name] = value end
      end
    end
    local h = require("http.headers").new()
    h:append(":status", tostring((handle(method, headers, body))))
    h:append("content-length", "0")
    stream:write_headers(h, true)
  end
end

-- "host:port", "[v6]:port" or ":port" (host 127.0.0.1)
local function address(listen)
  if type(listen) ~= "string" then return nil end
  local host, port = listen:match("^%[([^%]]+)%]:(%d+)$")
  if not host then host, port = listen:match("^([^:]*):(%d+)$") end
  port = tonumber(port)
  if not port or port > 65535 then return nil end
  return host ~= "" and host or "127.0.0.1", port
end

--- Run `fn(...)` as a task on the client's scheduler, with a lua-http
-- server listening for notices beside it, both driven from one cqueues
-- controller until the task ends; then the server closes. A notice wakes
-- the driver at once (a cqueues condition), so a wait sees it within a
-- step.
-- @tparam table o client, listen (`"HOST:PORT"`; port 0: any free one),
-- on_listen(host, port) (called once it accepts deliveries), and the
-- options of `onstream` (secrets, on_notice, on_refused, ...)
-- @param fn the function to run
-- @param ... its arguments
-- @return what `fn` returned, or nil and an error (`io`
-- `notify_listen` when the server cannot listen, `invalid` for a
-- missing lua-http or a wrong address)
function M.serve(o, fn, ...)
  errors.check("lua_http.serve", "o", o, "table")
  errors.check("lua_http.serve", "o.client", o.client, "table")
  errors.check("lua_http.serve", "fn", fn, "function")
  local host, port = address(o.listen)
  if not host then
    return nil, errors.new({ kind = "invalid", code = "notify_listen", param = "listen",
      message = ("lua_http.serve: listen must be HOST:PORT, not %s"):format(tostring(o.listen)) })
  end
  local ok_cq, cqueues = pcall(require, "cqueues")
  local ok_http, http_server = pcall(require, "http.server")
  if not ok_cq or not ok_http then
    return nil, errors.new({ kind = "invalid", code = "no_lua_http", message = "listening for notices needs "
      .. "lua-http and cqueues for this Lua (Debian's lua-http: LuaJIT and Lua 5.1 to 5.3)" })
  end
  local client = o.client
  local cq, woken = cqueues.new(), require("cqueues.condition").new()
  local so = {}
  for k, v in pairs(o) do so[k] = v end
  so.on_notice = function(notice)
    woken:signal()
    if o.on_notice then o.on_notice(notice) end
  end
  local made, server = pcall(http_server.listen, { host = host, port = port, cq = cq, onstream = M.onstream(so),
    onerror = function() end })
  local listening, why
  if made then listening, why = server:listen() else why = server end
  if not listening then
    if made then server:close() end
    return nil, errors.new({ kind = "io", code = "notify_listen", param = "listen",
      message = ("cannot listen on %s: %s"):format(o.listen, tostring(why)) })
  end
  if o.on_listen then
    local _, h, p = server:localname()
    o.on_listen(h, p)
  end
  local task = client:spawn(fn, ...)
  local failure
  cq:wrap(function()
    local pollable = client:pollable()
    while not task:done() do
      local _, err = client:step(STEP_MS)
      if err then failure = err break end
      if not task:done() then cqueues.poll(pollable, woken) end
    end
    server:close()
  end)
  local ran, cerr = cq:loop()
  if not ran then
    failure = failure or errors.new({ kind = "task", code = "notify_listen", message = tostring(cerr) })
  end
  if failure then return nil, failure end
  return task:join()
end

return M
