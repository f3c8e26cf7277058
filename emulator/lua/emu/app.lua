-- The HTTP side of the emulator: routing, auth, rate limits, fault
-- injection and the handlers of /files and /batches.
local cjson = require "cjson"
local store = require "emu.store"
local engine = require "emu.engine"
local util = require "emu.util"
local multipart = require "emu.multipart"
local rules = require "lbatch.rules"

local A = {}
local cfg

local MAX_UPLOAD = 500 * 1024 * 1024

---------------------------------------------------------------- responses

-- A response is {status, body (string), headers} or {status, file, headers}.
local function json(status, obj, headers)
  return { status = status, body = cjson.encode(obj), headers = headers }
end

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "invalid_request_error", [404] = "invalid_request_error",
  [409] = "invalid_request_error", [413] = "invalid_request_error", [422] = "invalid_request_error",
  [429] = "rate_limit_error", [500] = "server_error",
}

local function err(status, code, message, param, headers)
  return json(status, { error = {
    message = message, type = ERROR_TYPES[status] or "invalid_request_error",
    param = param or cjson.null, code = code or cjson.null,
  } }, headers)
end

-- A list page. Encoded by hand: lua-cjson 2.1.0 writes an empty table as {}.
local function page(items, has_more, null_when_empty)
  local parts = {}
  for i, o in ipairs(items) do parts[i] = cjson.encode(o) end
  local data = #parts > 0 and "[" .. table.concat(parts, ",") .. "]"
    or (null_when_empty and "null" or "[]")
  local first = items[1] and cjson.encode(items[1].id) or "null"
  local last = items[#items] and cjson.encode(items[#items].id) or "null"
  return { status = 200, body = '{"object":"list","data":' .. data .. ',"first_id":' .. first
    .. ',"last_id":' .. last .. ',"has_more":' .. tostring(has_more) .. "}" }
end

---------------------------------------------------------------- rate limits

local LIMITS = { create = 1000, retrieve = 1000, cancel = 1000, list = 100 }
local windows = {}  -- class -> {minute, count}

local function rate_limited(class)
  if not cfg.rate_limits or not LIMITS[class] then return nil end
  local now = ngx.now()
  local minute = math.floor(now / 60)
  local w = windows[class]
  if not w or w.minute ~= minute then w = { minute = minute, count = 0 } windows[class] = w end
  w.count = w.count + 1
  if w.count > LIMITS[class] then
    local wait = math.max(1, math.ceil((minute + 1) * 60 - now))
    return err(429, "rate_limit_exceeded",
      ("Rate limit reached: %d %s requests per minute."):format(LIMITS[class], class), nil,
      { ["Retry-After"] = tostring(wait) })
  end
end

---------------------------------------------------------------- faults & stats

local faults = {}
local stats = {}

local function take_fault(method, path)
  for i, f in ipairs(faults) do
    if (f.method == "*" or f.method == method) and path:find(f.path) then
      f.times = f.times - 1
      if f.times <= 0 then table.remove(faults, i) end
      return f
    end
  end
end

---------------------------------------------------------------- helpers

local function read_json_body()
  ngx.req.read_body()
  local data = ngx.req.get_body_data()
  if not data then
    local f = ngx.req.get_body_file()
    if f then
      local fh = io.open(f, "rb")
      data = fh and fh:read("*a")
      if fh then fh:close() end
    end
  end
  if not data or data == "" then return nil, err(400, "invalid_request", "Request body is empty; a JSON object is expected.") end
  local ok, obj = pcall(cjson.decode, data)
  if not ok or type(obj) ~= "table" then
    return nil, err(400, "invalid_json", "Request body is not a valid JSON object.")
  end
  return obj
end

local function int_arg(args, name, default, lo, hi)
  local v = args[name]
  if v == nil then return default end
  if type(v) ~= "string" or not v:match("^%d+$") then
    return nil, err(400, "invalid_parameter", name .. " must be an integer.", name)
  end
  v = tonumber(v)
  if v < lo or v > hi then
    return nil, err(400, "invalid_parameter", ("%s must be between %d and %d."):format(name, lo, hi), name)
  end
  return v
end

local function file_public(f)
  return { id = f.id, object = "file", bytes = f.bytes, created_at = f.created_at,
           filename = f.filename, purpose = f.purpose, status = f.status }
end

---------------------------------------------------------------- files

local function upload()
  local boundary = multipart.boundary(ngx.var.http_content_type)
  if not boundary then
    return err(400, "invalid_request", "Content-Type must be multipart/form-data with a boundary.")
  end
  ngx.req.read_body()
  local body_file = ngx.req.get_body_file()
  local tmp
  if not body_file then
    -- small bodies may stay in memory; spool them so there is one path
    local data = ngx.req.get_body_data() or ""
    tmp = store.blob("upload-" .. util.hex(12) .. ".body")
    local fh = assert(io.open(tmp, "wb"))
    fh:write(data)
    fh:close()
    body_file = tmp
  end
  local id = "file-batch-" .. util.uuid()
  local part = store.blob(id) .. ".part"
  local res, msg = multipart.parse(body_file, boundary, part, MAX_UPLOAD)
  if tmp then os.remove(tmp) end
  if not res then
    os.remove(part)
    if msg == "too_large" then
      return err(413, "file_too_large", "The file is larger than 500 MB.", "file")
    end
    return err(400, "invalid_multipart", "Malformed multipart body: " .. msg .. ".")
  end
  if not res.file then
    return err(400, "missing_file", "The multipart body has no 'file' part.", "file")
  end
  local purpose = res.fields.purpose
  if purpose == nil then
    os.remove(part)
    return err(400, "missing_purpose", "The 'purpose' field is required.", "purpose")
  end
  local allowed = cfg.dialect == "dashscope" and { batch = true }
    or { batch = true, assistants = true, ["fine-tune"] = true, vision = true, user_data = true, evals = true }
  if not allowed[purpose] then
    os.remove(part)
    return err(400, "invalid_purpose", ("purpose %q is not supported; use \"batch\"."):format(purpose), "purpose")
  end
  local f = {
    id = id, object = "file", bytes = res.file.bytes, created_at = math.floor(store.now()),
    filename = res.file.filename, purpose = purpose, status = "processed",
  }
  assert(os.rename(part, store.blob(id)))
  store.put_file(f)
  return json(200, file_public(f))
end

local function list_files(args)
  local limit, e = int_arg(args, "limit", 10000, 1, 10000)
  if not limit then return e end
  local order = args.order or "desc"
  if order ~= "asc" and order ~= "desc" then
    return err(400, "invalid_parameter", "order must be asc or desc.", "order")
  end
  local ids = store.file_order
  local from, to, dir = #ids, 1, -1
  if order == "asc" then from, to, dir = 1, #ids, 1 end
  local items, started = {}, args.after == nil
  local has_more = false
  for i = from, to, dir do
    local f = store.files[ids[i]]
    if f then
      if started and (not args.purpose or args.purpose == f.purpose) then
        if #items == limit then has_more = true break end
        items[#items + 1] = file_public(f)
      elseif f.id == args.after then
        started = true
      end
    end
  end
  return page(items, has_more, false)
end

local function get_file(id)
  local f = store.files[id]
  if not f then return err(404, "file_not_found", ("No such file: %s"):format(id), "file_id") end
  return nil, f
end

local function content(id)
  local e, f = get_file(id)
  if e then return e end
  if cfg.dialect == "dashscope" and f.purpose ~= "batch_output" then
    return err(400, "file_not_downloadable",
      "Only output and error files of batches can be downloaded.", "file_id")
  end
  return { status = 200, file = f.id, bytes = f.bytes }
end

---------------------------------------------------------------- batches

local ENDPOINTS = require("lbatch.service").ENDPOINTS

local function window_hours(w)
  if type(w) ~= "string" then return nil end
  local n, unit = w:match("^(%d+)([hd])$")
  n = tonumber(n)
  if not n then return nil end
  if cfg.dialect == "openai" then return w == "24h" and 24 or nil end
  local hours = unit == "d" and n * 24 or n
  if hours < 24 or hours > 336 then return nil end
  return hours
end

local function create_batch()
  local req, e = read_json_body()
  if not req then return e end
  local fid = req.input_file_id
  if type(fid) ~= "string" or fid == "" then
    return err(400, "missing_required_parameter", "input_file_id is required.", "input_file_id")
  end
  if type(req.endpoint) ~= "string" or not ENDPOINTS[req.endpoint] then
    return err(400, "invalid_endpoint",
      "endpoint must be one of /v1/chat/completions, /v1/embeddings, /v1/chat/ds-test.", "endpoint")
  end
  local hours = window_hours(req.completion_window)
  if not hours then
    return err(400, "invalid_completion_window", cfg.dialect == "openai"
      and "completion_window must be \"24h\"."
      or "completion_window must be between 24h and 336h (e.g. \"24h\", \"72h\", \"14d\").", "completion_window")
  end
  local meta = req.metadata
  if meta ~= nil and meta ~= cjson.null then
    if type(meta) ~= "table" then
      return err(400, "invalid_metadata", "metadata must be an object of strings.", "metadata")
    end
    local n = 0
    for k, v in pairs(meta) do
      n = n + 1
      if type(k) ~= "string" or type(v) ~= "string" or #k > 64 or #v > 512 then
        return err(400, "invalid_metadata",
          "metadata values must be strings (keys up to 64, values up to 512 characters).", "metadata")
      end
    end
    if n > 16 then return err(400, "invalid_metadata", "metadata has at most 16 keys.", "metadata") end
  else
    meta = nil
  end
  local f = store.files[fid]
  if not f then return err(404, "file_not_found", ("No such file: %s"):format(fid), "input_file_id") end
  if f.purpose ~= "batch" then
    return err(422, "invalid_input_file", ("File %s has purpose %q, not \"batch\"."):format(fid, f.purpose),
      "input_file_id")
  end
  if cfg.rate_limits and engine.running() >= 1000 then
    return err(429, "too_many_running_batches", "At most 1000 batches may be running at once.", nil,
      { ["Retry-After"] = "60" })
  end
  local now = store.now()
  local b = {
    id = "batch_" .. util.uuid(), object = "batch", endpoint = req.endpoint,
    input_file_id = fid, completion_window = req.completion_window, status = "validating",
    created_at = math.floor(now), expires_at = math.floor(now + hours * 3600),
    request_counts = { total = 0, completed = 0, failed = 0 }, metadata = meta,
    _ = { t_stage = now, t_expires = now + engine.scaled(hours * 3600) },
  }
  store.put_batch(b)
  engine.track(b)
  return json(200, util.public(b, engine))
end

local function get_batch(id)
  local b = store.batches[id]
  if not b then return nil, err(404, "batch_not_found", ("No such batch: %s"):format(id), "batch_id") end
  return b
end

local function cancel_batch(id)
  local b, e = get_batch(id)
  if not b then return e end
  local s = b.status
  if s == "validating" or s == "in_progress" then
    engine.cancel(b)
  elseif s ~= "cancelling" then
    return err(409, "batch_not_cancellable",
      ("Cannot cancel a batch with status %q."):format(engine.visible_status(b)), "batch_id")
  end
  return json(200, util.public(b, engine))
end

local function ts14(s)  -- yyyyMMddHHmmss (UTC) -> epoch seconds
  local y, mo, d, h, mi, se = s:match("^(%d%d%d%d)(%d%d)(%d%d)(%d%d)(%d%d)(%d%d)$")
  if not y then return nil end
  y, mo, d = tonumber(y), tonumber(mo), tonumber(d)
  -- days from civil (H. Hinnant's algorithm)
  local yy = mo <= 2 and y - 1 or y
  local era = math.floor(yy / 400)
  local yoe = yy - era * 400
  local mp = (mo + 9) % 12
  local doy = math.floor((153 * mp + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  local days = era * 146097 + doe - 719468
  return days * 86400 + tonumber(h) * 3600 + tonumber(mi) * 60 + tonumber(se)
end

local function list_batches(args)
  local limit, e = int_arg(args, "limit", 20, 1, 100)
  if not limit then return e end
  local statuses, files
  if args.status then
    statuses = {}
    for s in tostring(args.status):gmatch("[^,%s]+") do statuses[s] = true end
  end
  if args.input_file_ids then
    files = {}
    for s in tostring(args.input_file_ids):gmatch("[^,%s]+") do files[s] = true end
  end
  local after_t, before_t
  for _, k in ipairs({ "create_after", "create_before" }) do
    if args[k] then
      local t = ts14(tostring(args[k]))
      if not t then return err(400, "invalid_parameter", k .. " must be yyyyMMddHHmmss.", k) end
      if k == "create_after" then after_t = t else before_t = t end
    end
  end
  local name = args.ds_name and tostring(args.ds_name)
  local start = #store.batch_order
  if args.after then
    local pos = store.batch_pos[args.after]
    if not pos then return err(404, "batch_not_found", ("No such batch: %s"):format(args.after), "after") end
    start = pos - 1
  end
  local items, has_more = {}, false
  for i = start, 1, -1 do
    local b = store.batches[store.batch_order[i]]
    local meta = type(b.metadata) == "table" and b.metadata or {}
    if (not statuses or statuses[engine.visible_status(b)])
      and (not files or files[b.input_file_id])
      and (not after_t or b.created_at >= after_t)
      and (not before_t or b.created_at <= before_t)
      and (not name or (type(meta.ds_name) == "string" and meta.ds_name:find(name, 1, true))) then
      if #items == limit then has_more = true break end
      items[#items + 1] = util.public(b, engine)
    end
  end
  return page(items, has_more, cfg.dialect == "dashscope")
end

---------------------------------------------------------------- admin

local function admin(method, path)
  if path == "/_emulator/faults" then
    if method == "POST" then
      local rule, e = read_json_body()
      if not rule then return e end
      if type(rule.path) ~= "string" then
        return err(400, "invalid_fault", "A fault needs a path (a Lua pattern).", "path")
      end
      rule.method = rule.method or "*"
      rule.times = tonumber(rule.times) or 1
      faults[#faults + 1] = rule
      return json(200, { faults = #faults })
    elseif method == "DELETE" then
      faults = {}
      return json(200, { faults = 0 })
    end
  elseif path == "/_emulator/stats" and method == "GET" then
    return json(200, { routes = next(stats) and stats or cjson.null, running = engine.running() })
  elseif path == "/_emulator/clock" and method == "POST" then
    local body, e = read_json_body()
    if not body then return e end
    local adv = tonumber(body.advance)
    if not adv or adv < 0 then return err(400, "invalid_parameter", "advance must be >= 0 seconds.", "advance") end
    store.set_offset(store.offset + engine.scaled(adv))
    return json(200, { now = store.now() })
  end
  return err(404, "unknown_url", ("Invalid URL (%s %s)"):format(method, path))
end

---------------------------------------------------------------- routing

-- Returns route name (for stats), rate-limit class, handler thunk.
local function route(method, path, args)
  if path == "/v1/files" then
    if method == "POST" then return "POST /files", nil, upload end
    if method == "GET" then return "GET /files", nil, function() return list_files(args) end end
  elseif path == "/v1/batches" then
    if method == "POST" then return "POST /batches", "create", create_batch end
    if method == "GET" then return "GET /batches", "list", function() return list_batches(args) end end
  end
  local id = path:match("^/v1/files/([^/]+)$")
  if id then
    if method == "GET" then return "GET /files/{id}", nil, function()
      local e, f = get_file(id)
      return e or json(200, file_public(f))
    end end
    if method == "DELETE" then return "DELETE /files/{id}", nil, function()
      local e = get_file(id)
      if e then return e end
      store.delete_file(id)
      return json(200, { id = id, object = "file", deleted = true })
    end end
  end
  id = path:match("^/v1/files/([^/]+)/content$")
  if id and method == "GET" then return "GET /files/{id}/content", nil, function() return content(id) end end
  id = path:match("^/v1/batches/([^/]+)$")
  if id and method == "GET" then return "GET /batches/{id}", "retrieve", function()
    local b, e = get_batch(id)
    return e or json(200, util.public(b, engine))
  end end
  id = path:match("^/v1/batches/([^/]+)/cancel$")
  if id and method == "POST" then return "POST /batches/{id}/cancel", "cancel", function() return cancel_batch(id) end end
end

---------------------------------------------------------------- sending

local function send_headers(res, length)
  ngx.status = res.status
  for k, v in pairs(res.headers or {}) do ngx.header[k] = v end
  ngx.header["Content-Type"] = res.file and "application/octet-stream" or "application/json"
  ngx.header["x-request-id"] = util.uuid()
  if length then ngx.header["Content-Length"] = length end
end

-- Send `res`, spoiled as the fault says (fault.mode: close, truncate, invalid_json).
local function send(res, fault)
  local mode = fault and fault.mode
  if mode == "close" then return ngx.exit(444) end
  if res.file then
    if not mode then
      -- nginx serves it: sendfile, Range, Content-Length
      ngx.header["x-request-id"] = util.uuid()
      return ngx.exec("/_emulator_blob/" .. res.file)
    end
    -- a spoiled download: read the blob, stop half way
    send_headers(res, res.bytes)
    local fh = io.open(store.blob(res.file), "rb")
    local left = math.floor(res.bytes / 2)
    while left > 0 do
      local chunk = fh:read(math.min(left, 65536))
      if not chunk then break end
      left = left - #chunk
      ngx.print(chunk)
    end
    fh:close()
    ngx.flush(true)
    return ngx.exit(444)
  end
  local body = res.body
  if mode == "invalid_json" then body = body:sub(1, math.floor(#body / 2)) .. "<not json" end
  if mode == "truncate" then
    send_headers(res, #body)
    ngx.print(body:sub(1, math.floor(#body / 2)))
    ngx.flush(true)
    return ngx.exit(444)
  end
  send_headers(res, #body)
  ngx.print(body)
  return ngx.exit(res.status)
end

local function authorized()
  local h = ngx.var.http_authorization
  local key = h and h:match("^Bearer%s+(%S+)%s*$")
  if not key then return false end
  return cfg.api_key == nil or key == cfg.api_key
end

function A.handle()
  local method = ngx.req.get_method()
  local uri = ngx.var.uri
  local path = uri:gsub("^/compatible%-mode", "")
  if path:sub(1, 11) == "/_emulator/" then
    return send(admin(method, path))
  end
  local fault = take_fault(method, path)
  if fault and fault.delay then ngx.sleep(tonumber(fault.delay) or 0) end
  local name, class, handler = route(method, path, ngx.req.get_uri_args(100))
  if name then stats[name] = (stats[name] or 0) + 1 end
  if not authorized() then
    return send(err(401, "invalid_api_key", "Incorrect or missing API key (Authorization: Bearer KEY)."), fault)
  end
  if fault and fault.status and not fault.process then
    local h = {}
    if fault.retry_after then h["Retry-After"] = tostring(fault.retry_after) end
    if fault.retry_after_ms then h["retry-after-ms"] = tostring(fault.retry_after_ms) end
    return send(err(tonumber(fault.status), fault.code or "emulated_fault",
      fault.message or "Fault injected by the emulator.", nil, h))
  end
  if not name then
    return send(err(404, "unknown_url", ("Invalid URL (%s %s)"):format(method, uri)), fault)
  end
  local res = rate_limited(class)
  if not res then
    local ok, r = pcall(handler)
    if ok then res = r
    else
      ngx.log(ngx.ERR, "handler error: ", r)
      res = err(500, "internal_error", "The emulator hit an internal error.")
    end
  end
  if fault and fault.status and fault.process then
    res = err(tonumber(fault.status), fault.code or "emulated_fault", "Fault injected after processing.")
  end
  return send(res, fault)
end

-- nginx's own errors (header too large, body too large, ...) as JSON
function A.nginx_error()
  local status = tonumber(ngx.var.uri:match("(%d+)$")) or 400
  local messages = {
    [400] = "Bad request (malformed request or headers too large).",
    [413] = "Request body too large (files are at most 500 MB).",
    [414] = "Request URI too long.",
    [500] = "Internal error.",
  }
  local code = status == 413 and "request_too_large" or status == 500 and "internal_error" or "bad_request"
  local res = err(status == 414 and 400 or status, code, messages[status] or "Request failed.")
  send_headers(res, #res.body)
  ngx.print(res.body)
  return ngx.exit(res.status)
end

function A.init(config)
  cfg = config
  util.dialect = cfg.dialect
  store.open(cfg.data)
end

function A.init_worker()
  engine.start(cfg)
  ngx.timer.at(0, function()
    io.stdout:write(("listening on http://127.0.0.1:%d\n"):format(cfg.port))
    io.stdout:flush()
  end)
end

return A
