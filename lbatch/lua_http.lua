--- lbatch's notices on a lua-http server (Debian's `lua-http`, on
-- cqueues): a stream handler that verifies each delivery and hands the
-- notice to the client.
--
--    local server = require("http.server").listen{ host = "127.0.0.1", port = 8080,
--      onstream = require("lbatch.lua_http").onstream{ client = client, secrets = { "whsec_..." } } }
--
-- Drive the client from the same cqueues controller (its `pollable()`, as
-- examples/cqueues.lua does): a notice wakes the wait in that process.
-- @module lbatch.lua_http
local notify = require "lbatch.notify"

local M = {}

--- A lua-http `onstream` handler for webhook and callback deliveries.
-- @tparam table o client (the lbatch client to tell), and the options of
-- `lbatch.notify.new` (secrets, tolerance, max_body, ...), or notifier (a
-- receiver made already); on_notice(notice) and on_refused(err): called
-- for each delivery, if given
-- @treturn function onstream(server, stream): answers 200 to a notice,
-- 400 to a refused delivery, 405 to what is not a POST
function M.onstream(o)
  local n = o.notifier or notify.new(o)
  local client = o.client
  return function(_, stream)
    local req = stream:get_headers()
    local function answer(status)
      local h = require("http.headers").new()
      h:append(":status", tostring(status))
      h:append("content-length", "0")
      stream:write_headers(h, true)
    end
    if req:get(":method") ~= "POST" then return answer(405) end
    local body = stream:get_body_chars(n.max_body + 1, 10) or ""
    local headers = {}
    for name, value in req:each() do
      if name:sub(1, 1) ~= ":" then
        if headers[name] and headers[name] ~= value then headers[name] = { headers[name], value }
        else headers[name] = value end
      end
    end
    local notice, err = n:verify(headers, body)
    if not notice then
      if o.on_refused then o.on_refused(err) end
      return answer(400)
    end
    if client then client:notice(notice) end
    if o.on_notice then o.on_notice(notice) end
    return answer(200)
  end
end

return M
