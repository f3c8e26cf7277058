-- Answers: JSON bodies, errors in the service's shape, list pages, and
-- sending them (spoiled when a fault says so).
local cjson = require "cjson"
local store = require "emu.store"
local util = require "emu.util"

local R = {}

-- A response is {status, body (string), headers} or {status, file, bytes, headers}.
function R.json(status, obj, headers)
  return { status = status, body = cjson.encode(obj), headers = headers }
end

local ERROR_TYPES = {
  [400] = "invalid_request_error", [401] = "invalid_request_error", [404] = "invalid_request_error",
  [409] = "invalid_request_error", [413] = "invalid_request_error", [422] = "invalid_request_error",
  [429] = "rate_limit_error", [500] = "server_error",
}

function R.err(status, code, message, param, headers)
  return R.json(status, { error = {
    message = message, type = ERROR_TYPES[status] or "invalid_request_error",
    param = param or cjson.null, code = code or cjson.null,
  } }, headers)
end

-- A list page. Encoded by hand: lua-cjson 2.1.0 writes an empty table as {}.
-- null_when_empty: data is null for no items (the service's batch list);
-- no_ids: no first_id / last_id (the service's file list)
function R.page(items, has_more, null_when_empty, no_ids)
  local parts = {}
  for i, o in ipairs(items) do parts[i] = cjson.encode(o) end
  local data = #parts > 0 and "[" .. table.concat(parts, ",") .. "]"
    or (null_when_empty and "null" or "[]")
  local ids = ""
  if not no_ids then
    local first = items[1] and cjson.encode(items[1].id) or "null"
    local last = items[#items] and cjson.encode(items[#items].id) or "null"
    ids = ',"first_id":' .. first .. ',"last_id":' .. last
  end
  return { status = 200,
           body = '{"object":"list","data":' .. data .. ids .. ',"has_more":' .. tostring(has_more) .. "}" }
end

-- the service sends Batch API answers as application/json;charset=UTF-8
-- and Files API answers as application/json (spec/fixtures/recorded)
R.json_type = "application/json"
R.batch_type = "application/json"
R.file_type = "application/octet-stream"     -- the service's file content has none (nil)

local function send_headers(res, length)
  ngx.status = res.status
  for k, v in pairs(res.headers or {}) do ngx.header[k] = v end
  if res.file then ngx.header["Content-Type"] = R.file_type
  else ngx.header["Content-Type"] = res.batch_api and R.batch_type or R.json_type end
  ngx.header["x-request-id"] = util.uuid()
  if length then ngx.header["Content-Length"] = length end
end

-- The bytes of a file of `size` a Range header asks for, as nginx reads
-- it: from, to (inclusive) and true; nil when unsatisfiable; 0, size - 1
-- and false for none (or one not understood: the whole file).
local function range_of(header, size)
  if type(header) ~= "string" then return 0, size - 1, false end
  local a, b = header:match("^bytes=(%d*)%-(%d*)$")
  if not a or (a == "" and b == "") then return 0, size - 1, false end
  local from, to
  if a == "" then from, to = math.max(0, size - tonumber(b)), size - 1     -- the last b bytes
  else from, to = tonumber(a), b == "" and size - 1 or math.min(tonumber(b), size - 1) end
  if from >= size or from > to then return nil end
  return from, to, true
end

-- Print `count` bytes of a stored file from byte `from`, and flush them.
local function print_blob(file, from, count)
  local fh = io.open(store.blob(file), "rb")
  fh:seek("set", from)
  while count > 0 do
    local chunk = fh:read(math.min(count, 65536))
    if not chunk then break end
    count = count - #chunk
    ngx.print(chunk)
  end
  fh:close()
  ngx.flush(true)
end

-- A file's content (a Range honoured) cut after `cut` bytes of the body:
-- the full Content-Length announced, then the connection closed.
local function send_cut(res, cut)
  local from, to, partial = range_of(ngx.var.http_range, res.bytes)
  if not from then
    local e = R.err(416, "range_not_satisfiable", "The requested range is not satisfiable.",
      nil, { ["Content-Range"] = "bytes */" .. res.bytes })
    send_headers(e, #e.body)
    ngx.print(e.body)
    return ngx.exit(416)
  end
  local length = to - from + 1
  local h = { ["Accept-Ranges"] = "bytes" }
  if partial then h["Content-Range"] = ("bytes %d-%d/%d"):format(from, to, res.bytes) end
  send_headers({ status = partial and 206 or 200, file = res.file, headers = h }, length)
  print_blob(res.file, from, math.min(cut, length))
  if cut >= length then return ngx.exit(ngx.status) end
  return ngx.exit(444)
end

-- Send `res`, spoiled as the fault says (fault.mode: close, truncate, invalid_json).
function R.send(res, fault)
  local mode = fault and fault.mode
  if mode == "close" then return ngx.exit(444) end
  if res.file then
    if res.cut and not mode then return send_cut(res, res.cut) end
    if not mode then
      -- nginx serves it: sendfile, Range, Content-Length
      ngx.header["x-request-id"] = util.uuid()
      return ngx.exec("/_emulator_blob/" .. res.file)
    end
    -- a spoiled download: read the blob, stop half way
    send_headers(res, res.bytes)
    print_blob(res.file, 0, math.floor(res.bytes / 2))
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

-- nginx's own errors (header too large, body too large, ...) as JSON
function R.nginx_error()
  local status = tonumber(ngx.var.uri:match("(%d+)$")) or 400
  local messages = {
    [400] = "Bad request (malformed request or headers too large).",
    [413] = "Request body too large (files are at most 500 MB).",
    [414] = "Request URI too long.",
    [500] = "Internal error.",
  }
  local code = status == 413 and "request_too_large" or status == 500 and "internal_error" or "bad_request"
  local res = R.err(status == 414 and 400 or status, code, messages[status] or "Request failed.")
  send_headers(res, #res.body)
  ngx.print(res.body)
  return ngx.exit(res.status)
end

-- The request's JSON object body, or nil and an error response.
function R.read_json()
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
  if not data or data == "" then
    return nil, R.err(400, "invalid_request", "Request body is empty; a JSON object is expected.")
  end
  local ok, obj = pcall(cjson.decode, data)
  if not ok or type(obj) ~= "table" then
    return nil, R.err(400, "invalid_json", "Request body is not a valid JSON object.")
  end
  return obj
end

-- A query argument as an integer in [lo, hi], or nil and an error response.
function R.int_arg(args, name, default, lo, hi)
  local v = args[name]
  if v == nil then return default end
  if type(v) ~= "string" or not v:match("^%d+$") then
    return nil, R.err(400, "invalid_parameter", name .. " must be an integer.", name)
  end
  v = tonumber(v)
  if v < lo or v > hi then
    return nil, R.err(400, "invalid_parameter", ("%s must be between %d and %d."):format(name, lo, hi), name)
  end
  return v
end

return R
