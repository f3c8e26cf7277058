-- The admin paths, outside the API and without auth: faults to inject,
-- request counts, and the service clock.
local cjson = require "cjson"
local respond = require "emu.respond"
local store = require "emu.store"
local engine = require "emu.engine"
local modes = require "emu.modes"

local A = {}
local faults = {}
local last = {}                 -- the last API request: what a client sent
local stats = {}
local polled = {}               -- batch id -> status calls for it (GET /batches/{id})
local unread = {}               -- route -> requests counted whose body has not been read
local protocols, connections, seen = {}, 0, {}

-- the next fault for this request, if one matches (it is used up)
function A.take_fault(method, path)
  for i, f in ipairs(faults) do
    if (f.method == "*" or f.method == method) and path:find(f.path) then
      f.times = f.times - 1
      if f.times <= 0 then table.remove(faults, i) end
      return f
    end
  end
end

-- (body: the request has one, which the caller reads at once and then
-- calls A.body_read: a client cut off after its headers, a kill -9 between
-- its writes, is counted here and makes nothing: stats' cut)
function A.count(route, id, body)
  stats[route] = (stats[route] or 0) + 1
  if id and route == "GET /batches/{id}" then polled[id] = (polled[id] or 0) + 1 end
  if body then unread[route] = (unread[route] or 0) + 1 end
end
function A.body_read(route) unread[route] = unread[route] - 1 end

local function cut()
  local t = {}
  for route, n in pairs(unread) do if n > 0 then t[route] = n end end
  return next(t) and t or cjson.null
end

-- the last API request, for specs that check what a client sent: method,
-- path, query, auth, and what its handler noted (body, form fields)
-- (auth: "api-key" or "bearer", the scheme it came by, not the key)
function A.begin(method, path, query, headers)
  local auth = headers["api-key"] and "api-key" or headers.authorization and "bearer" or nil
  headers.authorization, headers["api-key"] = nil, nil      -- the key is not kept
  last = { method = method, path = path, query = query, headers = headers, auth = auth }
end
function A.note(k, v) last[k] = v end

-- every API request: by protocol (HTTP/1.1, HTTP/2.0), and the
-- connections they came on (nginx numbers each connection)
function A.seen(protocol, connection)
  protocols[protocol] = (protocols[protocol] or 0) + 1
  if connection and not seen[connection] then
    seen[connection] = true
    connections = connections + 1
  end
end

function A.handle(method, path)
  if path == "/_emulator/faults" then
    if method == "POST" then
      local rule, e = respond.read_json()
      if not rule then return e end
      if type(rule.path) ~= "string" then
        return respond.err(400, "invalid_fault", "A fault needs a path (a Lua pattern).", "path")
      end
      rule.method = rule.method or "*"
      rule.times = tonumber(rule.times) or 1
      faults[#faults + 1] = rule
      return respond.json(200, { faults = #faults })
    elseif method == "DELETE" then
      faults = {}
      return respond.json(200, { faults = 0 })
    end
  elseif path == "/_emulator/stats" and method == "GET" then
    -- routes: requests by route ("429 route" for those refused by a rate
    -- limit); cut: of those, the ones whose body never came (the client
    -- gone after its headers: they made nothing; a body still coming counts
    -- until it has come); running: batches not yet final, running_peak: the
    -- most at once; polled: retrieve calls by batch id; with ?finished=1,
    -- each batch's wall-clock end; now: this clock
    ngx.update_time()
    local args = ngx.req.get_uri_args(10)
    return respond.json(200, { routes = next(stats) and stats or cjson.null, cut = cut(),
                               running = engine.running(), running_peak = engine.peak,
                               polled = next(polled) and polled or cjson.null,
                               protocols = next(protocols) and protocols or cjson.null, connections = connections,
                               now = ngx.now(), modes_hit = next(modes.hits) and modes.hits or cjson.null,
                               finished = args.finished and next(engine.finished) and engine.finished or nil })
  elseif path == "/_emulator/modes" and (method == "GET" or method == "POST") then
    -- the failure modes on now (emulator/run's header): POST {NAME: {...} | false}
    if method == "POST" then
      local body, e = respond.read_json()
      if not body then return e end
      local ok, why = modes.set(body)
      if not ok then return respond.err(400, "invalid_mode", why) end
    end
    return respond.json(200, modes.on)          -- {} when none (lua-cjson 2.1.0)
  elseif path == "/_emulator/last" and method == "GET" then
    return respond.json(200, last)
  elseif path == "/_emulator/clock" and method == "POST" then
    local body, e = respond.read_json()
    if not body then return e end
    local adv = tonumber(body.advance)
    if not adv or adv < 0 then
      return respond.err(400, "invalid_parameter", "advance must be >= 0 seconds.", "advance")
    end
    store.set_offset(store.offset + engine.scaled(adv))
    return respond.json(200, { now = store.now() })
  end
  return respond.err(404, "unknown_url", ("Invalid URL (%s %s)"):format(method, path))
end

return A
