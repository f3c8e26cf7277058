-- The emulator's front door: routes, then the rooms behind them.
--   respond.lua  answers and sending      guard.lua    auth, rate limits
--   admin.lua    faults, stats, clock     files.lua    the Files API
--   batches.lua  the Batch API            engine.lua   the batch lifecycle
--   store.lua    state and its journal    util.lua     ids, public views
--   modes.lua    failure modes (emulator/run's header)
--   realtime.lua the real-time chat and embeddings endpoints
--   batchchat.lua DashScope's Batch Chat (held calls), under /_batchchat
-- A new endpoint is one line in ROUTES and a handler in its room.
local respond = require "emu.respond"
local guard = require "emu.guard"
local admin = require "emu.admin"
local files = require "emu.files"
local batches = require "emu.batches"
local store = require "emu.store"
local engine = require "emu.engine"
local util = require "emu.util"
local providers = require "emu.providers"
local realtime = require "emu.realtime"
local batchchat = require "emu.batchchat"

local A = {}
local cfg

-- method, path pattern (captures the id), route name (for stats), rate
-- limit class, handler(id or args), "args" (the handler takes the query),
-- "signed" (a presigned URL: its signature, not the key, lets it in)
local ROUTES = {
  { "POST", "^/v1/files$", "POST /files", nil, files.upload },
  { "GET", "^/v1/files$", "GET /files", nil, files.list, "args" },
  { "GET", "^/v1/files/([^/]+)$", "GET /files/{id}", nil, files.get },
  { "DELETE", "^/v1/files/([^/]+)$", "DELETE /files/{id}", nil, files.delete },
  { "GET", "^/v1/files/([^/]+)/content$", "GET /files/{id}/content", nil, files.content },
  { "POST", "^/v1/files/([^/]+)/preprocess$", "POST /files/{id}/preprocess", nil, files.preprocess },
  { "PUT", "^/_presigned/([^/]+)$", "PUT presigned", nil, files.put_presigned, nil, "signed" },
  { "POST", "^/v1/batches$", "POST /batches", "create", batches.create },
  { "GET", "^/v1/batches$", "GET /batches", "list", batches.list, "args" },
  { "GET", "^/v1/batches/([^/]+)$", "GET /batches/{id}", "retrieve", batches.get },
  { "POST", "^/v1/batches/([^/]+)/cancel$", "POST /batches/{id}/cancel", "cancel", batches.cancel },
  { "POST", "^(/v1/chat/completions)$", "POST /chat/completions", nil, realtime.handle },
  { "POST", "^(/v1/embeddings)$", "POST /embeddings", nil, realtime.handle },
}

local function route(method, path)
  for _, r in ipairs(ROUTES) do
    if r[1] == method then
      local id = path:match(r[2])
      if id then return r, id end
    end
  end
end

function A.handle()
  local method = ngx.req.get_method()
  local uri = ngx.var.uri
  local path = providers.path((uri:gsub("^/compatible%-mode", "")))
  if path:sub(1, 11) == "/_emulator/" then
    return respond.send(admin.handle(method, path))
  end
  -- Batch Chat (emu.batchchat): its own host in the service, /_batchchat here
  local bc = uri:match("^/_batchchat(/.*)$")
  if bc and bc:sub(1, 2) == "/_" then return respond.send(batchchat.admin(method, bc)) end
  admin.seen(ngx.var.server_protocol, ngx.var.connection)
  if bc then return respond.send(batchchat.handle(method, bc)) end
  admin.begin(method, path, ngx.req.get_uri_args(100), ngx.req.get_headers(100))
  local fault = admin.take_fault(method, path)
  if fault and fault.delay then ngx.sleep(tonumber(fault.delay) or 0) end
  local r, id = route(method, path)
  if r then
    -- a body is read at once, so that a request cut off after its headers
    -- (it made nothing) is told from one that came whole (stats' cut)
    local body = method == "POST" or method == "PUT"
    admin.count(r[3], id, body)
    if body then
      ngx.req.read_body()
      admin.body_read(r[3])
    end
  end
  if not (r and r[7] == "signed") and not guard.authorized() then
    return respond.send(respond.err(401, "invalid_api_key",
      "Incorrect or missing API key (Authorization: Bearer KEY)."), fault)
  end
  if fault and fault.status and not fault.process then
    local h = {}
    if fault.retry_after then h["Retry-After"] = tostring(fault.retry_after) end
    if fault.retry_after_ms then h["retry-after-ms"] = tostring(fault.retry_after_ms) end
    return respond.send(respond.err(tonumber(fault.status), fault.code or "emulated_fault",
      fault.message or "Fault injected by the emulator.", nil, h))
  end
  if not r then
    return respond.send(respond.err(404, "unknown_url", ("Invalid URL (%s %s)"):format(method, uri)), fault)
  end
  local res = guard.rate_limited(r[4])
  if res then admin.count("429 " .. r[3]) end
  if not res then
    local arg = r[6] == "args" and ngx.req.get_uri_args(100) or id
    local ok, out = pcall(r[5], arg)
    if ok then res = out
    else
      ngx.log(ngx.ERR, "handler error: ", out)
      res = respond.err(500, "internal_error", "The emulator hit an internal error.")
    end
  end
  res = providers.answer(r and r[3], res)
  res.batch_api = r and r[3]:find("/batches", 1, true) ~= nil
  if fault and fault.status and fault.process then
    res = respond.err(tonumber(fault.status), fault.code or "emulated_fault", "Fault injected after processing.")
  end
  if fault and type(fault.headers) == "table" then     -- what a tampering proxy would put in
    res.headers = res.headers or {}
    for k, v in pairs(fault.headers) do
      if type(k) == "string" and type(v) == "string" then res.headers[k] = v end
    end
  end
  return respond.send(res, fault)
end

A.nginx_error = respond.nginx_error

function A.init(config)
  cfg = config
  cfg.profile = require("lbatch.impl.api.service").profile(cfg.profile)
  util.dialect = cfg.dialect
  providers.init(cfg.provider)
  if cfg.dialect == "dashscope" then
    respond.batch_type = "application/json;charset=UTF-8"
    respond.file_type = nil
  end
  guard.init(cfg)
  batchchat.init(cfg)
  files.init(cfg)
  batches.init(cfg)
  store.open(cfg.data)
  require("emu.modes").load(cfg.modes)
  require("emu.webhooks").init(cfg)
end

function A.init_worker()
  engine.start(cfg)
  ngx.timer.at(0, function()
    io.stdout:write(("listening on %s://127.0.0.1:%d\n"):format(cfg.scheme or "http", cfg.port))
    io.stdout:flush()
  end)
end

return A
