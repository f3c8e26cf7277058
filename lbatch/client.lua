-- The client: every Batch and File operation, with retries, over one loop.
local cjson = require "cjson"
local Loop = require "lbatch.loop"
local errors = require "lbatch.errors"
local now = require("lbatch.core").now

local VERSION = "0.1.0"

local REGIONS = {
  cn = "https://dashscope.aliyuncs.com/compatible-mode/v1",
  intl = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
  openai = "https://api.openai.com/v1",
}

local Client = { VERSION = VERSION, REGIONS = REGIONS }
Client.__index = Client

-- the API key lives here, not in the client table, so dumping a client
-- never shows it
local secrets = setmetatable({}, { __mode = "k" })

local function argerror(fn, msg) error("lbatch." .. fn .. ": " .. msg, 3) end

local function check(fn, name, v, want, optional)
  if v == nil and optional then return end
  if type(v) ~= want then
    argerror(fn, ("%s must be a %s (got %s)"):format(name, want, type(v)))
  end
end

------------------------------------------------------------------ construction

function Client.new(opts)
  opts = opts or {}
  check("new", "opts", opts, "table")
  local region = opts.region or "cn"
  if not REGIONS[region] then argerror("new", "region must be cn, intl or openai") end
  check("new", "api_key", opts.api_key, "string", true)
  check("new", "base_url", opts.base_url, "string", true)
  check("new", "headers", opts.headers, "table", true)
  for _, k in ipairs({ "timeout", "connect_timeout", "max_retries", "max_connections",
                       "stall_timeout", "transfer_timeout", "retry_after_cap" }) do
    check("new", k, opts[k], "number", true)
  end
  local key = opts.api_key
  if not key then
    if region == "openai" then key = os.getenv("OPENAI_API_KEY") or os.getenv("DASHSCOPE_API_KEY")
    else key = os.getenv("DASHSCOPE_API_KEY") or os.getenv("OPENAI_API_KEY") end
  end
  if not key or key == "" then
    argerror("new", "no API key: pass api_key or set DASHSCOPE_API_KEY (or OPENAI_API_KEY)")
  end
  local base = opts.base_url or os.getenv("LBATCH_BASE_URL")
  if not base or base == "" then base = REGIONS[region] end
  base = base:gsub("/+$", "")

  local headers = {
    "Authorization: Bearer " .. key,
    "Accept: application/json",
    "User-Agent: lbatch/" .. VERSION,
  }
  for k, v in pairs(opts.headers or {}) do
    if type(k) == "number" then headers[#headers + 1] = tostring(v)
    else headers[#headers + 1] = tostring(k) .. ": " .. tostring(v) end
  end
  local self = setmetatable({
    base_url = base,
    region = region,
    config = {  -- seconds
      timeout = opts.timeout or 600,
      connect_timeout = opts.connect_timeout or 10,
      stall_timeout = opts.stall_timeout or 30,
      transfer_timeout = opts.transfer_timeout,
      max_retries = opts.max_retries or 2,
      retry_after_cap = opts.retry_after_cap or 60,
      cainfo = opts.cainfo,
    },
    loop = Loop.new({ max_connections = opts.max_connections or 16 }),
  }, Client)
  local json_headers = { "Content-Type: application/json" }
  for i, h in ipairs(headers) do json_headers[i + 1] = h end
  secrets[self] = { key = key, headers = headers, json_headers = json_headers }
  return self
end

------------------------------------------------------------------ responses

local function parse_headers(raw)
  local h = {}
  for name, value in (raw or ""):gmatch("([%w%-]+):[ \t]*([^\r\n]*)") do
    h[name:lower()] = value
  end
  return h
end

-- JSON null as nil, so `if batch.output_file_id then` means what it says,
-- and whole numbers as integers on Lua 5.3+ (lua-cjson 2.1.0 decodes floats)
local null = cjson.null
local tointeger = math.tointeger or function(v) return v end
local function normalize(t)
  for k, v in pairs(t) do
    if v == null then t[k] = nil
    elseif type(v) == "table" then normalize(v)
    elseif type(v) == "number" then t[k] = tointeger(v) or v end
  end
  return t
end

local function decode(body)
  local ok, v = pcall(cjson.decode, body)
  if ok and type(v) == "table" then return normalize(v) end
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6,
                 Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- HTTP date -> seconds from now
local function http_date_delay(s)
  local d, mon, y, hh, mm, ss = s:match("(%d+) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d)")
  local mo = MONTHS[mon or ""]
  if not mo then return nil end
  y = tonumber(y)
  local yy = mo <= 2 and y - 1 or y
  local era = math.floor(yy / 400)
  local yoe = yy - era * 400
  local doy = math.floor((153 * ((mo + 9) % 12) + 2) / 5) + tonumber(d) - 1
  local days = era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
  return days * 86400 + hh * 3600 + mm * 60 + ss - os.time()
end

-- seconds the server asked us to wait, if it did
local function retry_after(h)
  local ms = tonumber(h["retry-after-ms"] or "")
  if ms then return ms / 1000 end
  local ra = h["retry-after"]
  if not ra then return nil end
  return tonumber(ra) or http_date_delay(ra)
end

-- curl result codes that are worth another attempt
local RETRY_CURL = { [5] = true, [6] = true, [7] = true, [16] = true, [18] = true, [28] = true,
                     [35] = true, [52] = true, [55] = true, [56] = true, [92] = true }
-- ... and those after which the request surely never reached the server
local NOT_SENT = { [5] = true, [6] = true, [7] = true, [35] = true }

function Client:_error(fields)
  return errors.new(fields, secrets[self].key)
end

-- A transfer's result as a value, or nil and an error.
function Client:_result(res, raw)
  if res.code ~= 0 then
    local kind = res.code == 28 and "timeout" or res.code == 42 and "cancelled" or "network"
    return nil, self:_error({ kind = kind, code = "curl_" .. res.code, message = res.error,
                              retryable = RETRY_CURL[res.code] or false, not_sent = NOT_SENT[res.code] })
  end
  local status = res.status
  if res.fail then
    return nil, self:_error({ kind = "network", status = status, code = "truncated", message = res.error, retryable = true })
  end
  if status < 200 or status >= 300 then
    local h = parse_headers(res.headers)
    local body = res.body and decode(res.body) or {}
    local e = type(body.error) == "table" and body.error or body
    local message = e.message
    if type(message) ~= "string" then
      message = ("HTTP %d%s"):format(status, res.body and res.body ~= "" and (": " .. res.body:sub(1, 200)) or "")
    end
    return nil, self:_error({
      kind = "http", status = status, message = message,
      code = type(e.code) == "string" and e.code or (e.code and tostring(e.code)) or nil,
      type = type(e.type) == "string" and e.type or nil,
      param = type(e.param) == "string" and e.param or nil,
      request_id = body.request_id or h["x-request-id"] or h["x-dashscope-request-id"] or h["req-id"],
      retryable = status == 408 or status == 409 or status == 429 or status >= 500,
      retry_after = retry_after(h),
    })
  end
  if res.path then return res.path end
  if raw then return res.body end
  local v = decode(res.body or "")
  if v == nil then
    return nil, self:_error({ kind = "decode", status = status,
      message = "response is not a JSON object: " .. (res.body or ""):sub(1, 120) })
  end
  return v
end

------------------------------------------------------------------ requests

local function pct(c) return ("%%%02X"):format(c:byte()) end
local function urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", pct))
end

local function query(params, keys)
  local q = {}
  for _, k in ipairs(keys) do
    local v = params and params[k]
    if v ~= nil then
      if type(v) == "table" then v = table.concat(v, ",") end
      q[#q + 1] = k .. "=" .. urlencode(v)
    end
  end
  return #q > 0 and ("?" .. table.concat(q, "&")) or ""
end

function Client:_backoff(attempt, err)
  local wait = err.retry_after
  if wait then return math.max(0, wait) end
  local base = math.min(8, 0.5 * 2 ^ attempt)
  return base * (0.75 + 0.25 * math.random())  -- jitter
end

-- One API call with retries. o: body (JSON string), form, download, raw,
-- stream (no whole-request timeout), fresh (a new connection),
-- recover(err) -> value | nil, stop.
function Client:_call(method, path, o)
  o = o or {}
  local s = secrets[self]
  if not s then error("lbatch: the client is closed", 3) end
  local cfg = self.config
  local spec = {
    url = self.base_url .. path, method = method, headers = o.body and s.json_headers or s.headers,
    body = o.body, form = o.form, download = o.download, cainfo = cfg.cainfo, fresh = o.fresh,
    connect_timeout = cfg.connect_timeout * 1000,
    timeout = (o.stream and (cfg.transfer_timeout or 0) or cfg.timeout) * 1000,
    low_speed_limit = 1, low_speed_time = cfg.stall_timeout,
  }
  local attempt = 0
  while true do
    local res = self.loop:transfer(spec)
    local value, err = self:_result(res, o.raw)
    if value ~= nil then return value end
    if not err.retryable or attempt >= cfg.max_retries then return nil, err end
    local wait = self:_backoff(attempt, err)
    if wait > cfg.retry_after_cap then return nil, err end
    self.loop:sleep(wait)
    if o.recover then
      local found, stop = o.recover(err)
      if found ~= nil then return found end
      if stop then return nil, err end
    end
    attempt = attempt + 1
  end
end

------------------------------------------------------------------ files

local function basename(p) return (p:match("([^/\\]+)$")) or p end

function Client:upload(path, opts)
  check("upload", "path", path, "string")
  check("upload", "opts", opts, "table", true)
  opts = opts or {}
  check("upload", "opts.purpose", opts.purpose, "string", true)
  check("upload", "opts.filename", opts.filename, "string", true)
  local fh, msg = io.open(path, "rb")
  if not fh then
    return nil, self:_error({ kind = "invalid", message = "cannot read " .. tostring(msg), param = "path" })
  end
  fh:close()
  return self:_call("POST", "/files", { stream = true, form = {
    { name = "purpose", value = opts.purpose or "batch" },
    { name = "file", file = path, filename = opts.filename or basename(path) },
  } })
end

-- a list page; data is always a table (the dashscope dialect sends null)
function Client:_page(path, params, keys)
  local p, err = self:_call("GET", path .. query(params, keys))
  if not p then return nil, err end
  if type(p.data) ~= "table" then p.data = {} end
  return p
end

local FILE_KEYS = { "purpose", "limit", "order", "after" }

function Client:files(params)
  check("files", "params", params, "table", true)
  return self:_page("/files", params, FILE_KEYS)
end

function Client:file(id)
  check("file", "id", id, "string")
  return self:_call("GET", "/files/" .. urlencode(id))
end

function Client:delete_file(id)
  check("delete_file", "id", id, "string")
  return self:_call("DELETE", "/files/" .. urlencode(id))
end

-- content(id) -> the body; content(id, {path = p}) -> p, written whole or not at all
function Client:content(id, opts)
  check("content", "id", id, "string")
  check("content", "opts", opts, "table", true)
  local path = opts and opts.path
  check("content", "opts.path", path, "string", true)
  return self:_call("GET", "/files/" .. urlencode(id) .. "/content",
    { download = path, raw = true, stream = path ~= nil })
end

------------------------------------------------------------------ batches

local function same_metadata(a, b)
  a, b = a or {}, b or {}
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k, v in pairs(b) do if a[k] ~= v then return false end end
  return true
end

-- After an attempt whose outcome is unknown: the batch it may have created.
function Client:_find_created(params, since)
  local page, err = self:_call("GET", "/batches?limit=100")
  if not page then return nil, err end
  for _, b in ipairs(type(page.data) == "table" and page.data or {}) do
    if b.input_file_id == params.input_file_id and b.endpoint == params.endpoint
      and same_metadata(b.metadata, params.metadata) and (b.created_at or 0) >= since then
      return b
    end
  end
end

function Client:create(params)
  check("create", "params", params, "table")
  check("create", "input_file_id", params.input_file_id, "string")
  check("create", "endpoint", params.endpoint, "string")
  check("create", "completion_window", params.completion_window, "string", true)
  check("create", "metadata", params.metadata, "table", true)
  local req = {
    input_file_id = params.input_file_id, endpoint = params.endpoint,
    completion_window = params.completion_window or "24h", metadata = params.metadata,
  }
  if params.metadata and next(params.metadata) == nil then req.metadata = nil end
  -- allow for clock skew between us and the server
  local since = os.time() - 300
  return self:_call("POST", "/batches", {
    body = cjson.encode(req),
    fresh = true,   -- see lbatch/core/xfer.c: libcurl must not resend this on its own
    recover = function(err)
      if err.not_sent or err.status == 429 or err.status == 408 then return nil end
      local found, lerr = self:_find_created(req, since)
      if found then return found end
      return nil, lerr ~= nil   -- cannot tell: do not risk a second batch
    end,
  })
end

function Client:retrieve(id)
  check("retrieve", "batch_id", id, "string")
  return self:_call("GET", "/batches/" .. urlencode(id))
end

function Client:cancel(id)
  check("cancel", "batch_id", id, "string")
  return self:_call("POST", "/batches/" .. urlencode(id) .. "/cancel")
end

local LIST_KEYS = { "after", "limit", "status", "ds_name", "input_file_ids", "create_after", "create_before" }

function Client:list(params)
  check("list", "params", params, "table", true)
  return self:_page("/batches", params, LIST_KEYS)
end

-- for batch, err in client:batches{...}: every batch, page after page.
-- On a failure the loop sees batch == false and the error, then ends.
function Client:batches(params)
  check("batches", "params", params, "table", true)
  local q = {}
  for k, v in pairs(params or {}) do q[k] = v end
  local items, i, more, failed = {}, 1, true, false
  return function()
    while i > #items do
      if not more or failed then return nil end
      local page, err = self:list(q)
      if not page then failed = true return false, err end
      items, i = page.data, 1
      more = page.has_more and #items > 0
      if #items > 0 then q.after = page.last_id or items[#items].id end
    end
    i = i + 1
    return items[i - 1]
  end
end

local FINAL = { completed = true, failed = true, expired = true, cancelled = true }
Client.FINAL = FINAL

-- wait(batch_id, {interval = 60, factor = 1.5, max_interval = 600, jitter = 0.1,
-- deadline = seconds, on_progress = fn(batch)}): poll until the batch is
-- final, with backoff. The service asks for about a minute between polls.
-- on_progress runs on every change of status or counts. Returns the batch,
-- or nil, err (kind "timeout" past the deadline, with err.batch).
function Client:wait(id, opts)
  check("wait", "batch_id", id, "string")
  check("wait", "opts", opts, "table", true)
  opts = opts or {}
  for _, k in ipairs({ "interval", "factor", "max_interval", "jitter", "deadline" }) do
    check("wait", "opts." .. k, opts[k], "number", true)
  end
  check("wait", "opts.on_progress", opts.on_progress, "function", true)
  local interval, factor = opts.interval or 60, opts.factor or 1.5
  local cap, jitter = opts.max_interval or 600, opts.jitter or 0.1
  local stop = opts.deadline and (now() + opts.deadline)
  local last
  while true do
    local b, err = self:retrieve(id)
    if not b then return nil, err end
    local c = b.request_counts or {}
    local sig = ("%s %s %s %s"):format(b.status, c.total, c.completed, c.failed)
    if sig ~= last then
      last = sig
      if opts.on_progress then opts.on_progress(b) end
    end
    if FINAL[b.status] then return b end
    local pause = interval * (1 + jitter * (2 * math.random() - 1))
    if stop and now() + pause > stop then
      local e = self:_error({ kind = "timeout", code = "wait_deadline",
        message = ("batch %s is still %s at the wait deadline"):format(id, b.status) })
      e.batch = b
      return nil, e
    end
    self.loop:sleep(pause)
    interval = math.min(interval * factor, cap)
  end
end

------------------------------------------------------------------ the loop

function Client:spawn(fn, ...) return self.loop:spawn(fn, ...) end

function Client:sleep(seconds) return self.loop:sleep(seconds) end

-- pause(): in a task's long work (building requests, reading results), let
-- a host's step() return once its budget is spent; the work goes on at the
-- next step. Under run() or outside a task it returns at once.
function Client:pause() return self.loop:pause() end

-- run(): until every task is done; nil, traceback when one fails
function Client:run()
  local loop = self.loop
  if loop:current() then error("lbatch.run: cannot be called from inside a task", 2) end
  while true do
    local tb = loop:take_failure()
    if tb then return nil, tb end
    if loop.alive == 0 then return true end
    loop:drive(true)
  end
end

-- step([budget_ms = 0.5]): do what is ready, never wait. Sockets are handed
-- to libcurl for up to half the budget, tasks are resumed until it is
-- spent, and the rest waits for the next step (timeout() is then 0).
-- Returns the work still pending (tasks and transfers) and, when a task
-- failed, its traceback.
function Client:step(budget_ms)
  check("step", "budget_ms", budget_ms, "number", true)
  self.loop:drive(false, budget_ms or 0.5)
  return self.loop:pending(), self.loop:take_failure()
end

function Client:timeout() return self.loop:timeout() end
function Client:pollfd() return self.loop.ctl:pollfd() end
-- pollable(): the client for cqueues' pollable protocol (cqueues.poll):
-- its descriptor, "r", and the timeout in seconds (nil: none)
function Client:pollable()
  local client = self
  return {
    pollfd = function() return client:pollfd() end,
    events = function() return "r" end,
    timeout = function()
      local ms = client:timeout()
      if ms >= 0 then return ms / 1000 end
    end,
  }
end

function Client:close()
  if secrets[self] then
    self.loop.ctl:close()
    secrets[self] = nil
  end
end

return Client
