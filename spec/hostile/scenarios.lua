-- A hostile server's scenarios (spec/hostile/run). A request to
-- /s/NAME[-ARG]/v1/... gets scenario NAME's answer: secrets echoed into
-- every field, stalls, drips, cursors that never move, bodies that are
-- arrays, strings, 100k-deep, 200 MB or full of NULs, huge headers,
-- redirects, encodings nobody asked for. Written to be nasty, not
-- faithful: the emulator is the faithful one.
local cjson = require "cjson"

local M = {}
local S = {}
local dict = ngx.shared.hostile

local function reply(status, body, headers)
  ngx.status = status
  for k, v in pairs(headers or {}) do ngx.header[k] = v end
  if ngx.header["Content-Type"] == nil then ngx.header["Content-Type"] = "application/json" end
  ngx.header["Content-Length"] = #body
  ngx.print(body)
  return ngx.exit(status)
end

-- exact bytes on the wire (headers nginx would refuse to write), then close
local function raw(bytes)
  ngx.req.read_body()
  local sock = assert(ngx.req.socket(true))
  sock:send(bytes)
  return ngx.exit(444)
end

local function json(status, obj, headers) return reply(status, cjson.encode(obj), headers) end

------------------------------------------------------------------ secrets

-- every field and header carries the key
function S.echo(r)
  local k = r.key
  return json(400, { error = { message = "bad request for key " .. k, code = k, param = k, type = k },
                     request_id = k }, { ["x-request-id"] = k })
end

-- not JSON: the body as the message, the key just where a 200-byte cut falls
function S.echo_cut(r)
  return reply(500, ("x"):rep(190) .. r.key .. " and more after it", { ["Content-Type"] = "text/plain" })
end

-- a piece of the key only
function S.echo_fragment(r)
  return json(400, { error = { message = "your key begins " .. r.key:sub(1, 12) .. "... and is wrong" } })
end

-- a successful answer that carries the key in its data and headers
function S.echo_success(r)
  return json(200, { id = "batch_1", object = "batch", status = "completed", metadata = { note = r.key },
                     request_counts = { total = 1, completed = 1, failed = 0 } }, { ["x-request-id"] = r.key })
end

------------------------------------------------------------------ lists

function S.cursor_loop()
  return json(200, { object = "list", data = { { id = "batch_a", status = "completed" } },
                     first_id = "batch_a", last_id = "batch_a", has_more = true })
end

function S.cursor_empty()
  return reply(200, '{"object":"list","data":[],"first_id":null,"last_id":null,"has_more":true}')
end

function S.null_data()
  return reply(200, '{"object":"list","data":[null,{"id":"batch_1","status":"completed"},7,"x",'
    .. '{"id":"batch_2","status":"failed"},null],"has_more":false}')
end

------------------------------------------------------------------ time

-- the first request of a round stalls after its headers; the others answer
function S.stall_first()
  if dict:incr("stall_first", 1, 0) == 1 then
    ngx.status = 200
    ngx.header["Content-Type"] = "application/json"
    ngx.header["Content-Length"] = 100
    ngx.send_headers()
    ngx.flush(true)
    ngx.sleep(60)
    return ngx.exit(444)
  end
  return reply(200, '{"object":"list","data":[],"has_more":false}')
end

-- headers, then nothing
function S.stall()
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = 100
  ngx.send_headers()
  ngx.flush(true)
  ngx.sleep(60)
  return ngx.exit(444)
end

-- a byte every ARG ms (default 200): slow, but never still
function S.drip(r)
  local every = (tonumber(r.arg) or 200) / 1000
  local body = '{"object":"list","data":[],"has_more":false}'
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = #body
  ngx.send_headers()
  for i = 1, #body do
    ngx.print(body:sub(i, i))
    ngx.flush(true)
    ngx.sleep(every)
  end
  return ngx.exit(200)
end

-- a server that takes a request's body slowly (ARG KB every 100 ms,
-- default 64), then answers as the service would: an upload that lasts
-- long enough for its progress to be reported many times
function S.slow_reader(r)
  local per = (tonumber(r.arg) or 64) * 1024
  local left = tonumber(ngx.var.http_content_length) or 0
  local sock = assert(ngx.req.socket())
  while left > 0 do
    local got = sock:receive(math.min(per, left))
    if not got then break end
    left = left - #got
    ngx.sleep(0.1)
  end
  local now = ngx.time()
  if ngx.var.uri:find("/files$") then
    return json(200, { id = "file-slow", object = "file", bytes = tonumber(ngx.var.http_content_length),
                       filename = "slow.jsonl", purpose = "batch", status = "processed", created_at = now })
  end
  return json(200, { id = "batch_slow", object = "batch", endpoint = "/v1/chat/completions", status = "validating",
                     input_file_id = "file-slow", completion_window = "24h", created_at = now,
                     request_counts = { total = 0, completed = 0, failed = 0 } })
end

------------------------------------------------------------------ shapes

function S.array() return reply(200, "[1,2,3]") end
function S.string() return reply(200, '"a batch, honestly"') end
function S.empty() return reply(200, "") end

-- ARG thousand levels of nesting (default 100)
function S.deep(r)
  local n = (tonumber(r.arg) or 100) * 1000
  return reply(200, ("["):rep(n) .. ("]"):rep(n))
end

-- a JSON answer of ARG MB (default 200), streamed
function S.huge(r)
  local mb = tonumber(r.arg) or 200
  local head, tail = '{"id":"batch_1","object":"batch","status":"completed","pad":"', '"}'
  local chunk = ("a"):rep(1024 * 1024)
  ngx.status = 200
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Content-Length"] = #head + mb * #chunk + #tail
  ngx.print(head)
  for _ = 1, mb do
    ngx.print(chunk)
    ngx.flush(true)
  end
  ngx.print(tail)
  return ngx.exit(200)
end

-- a header block of ARG kB (default 2048) in one header
function S.huge_headers(r)
  local kb = tonumber(r.arg) or 2048
  return raw("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Padding: " .. ("p"):rep(kb * 1024)
    .. "\r\nContent-Length: 2\r\n\r\n{}")
end

-- NUL bytes and invalid UTF-8 in an error, in its headers too
function S.nul()
  local body = '{"error":{"message":"bad \\u0000 byte \255\254 here\r\nX-Evil: 1","code":"nul"}}'
  return raw("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nX-Request-Id: a\255\254b\r\n"
    .. "Content-Length: " .. #body .. "\r\nConnection: close\r\n\r\n" .. body)
end

function S.nul_header()
  return raw("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-Id: a\0b\r\n"
    .. "Content-Length: 2\r\nConnection: close\r\n\r\n{}")
end

-- error fields of every type but string
function S.odd_fields()
  return reply(400, '{"error":{"message":{"text":"a table"},"code":{"a":1},"param":5,"type":true},"request_id":[1]}')
end

function S.redirect()
  return reply(302, '{"moved":true}', { Location = "http://127.0.0.1:9/elsewhere" })
end

-- status N (200 unless given) and a body that is a batch, with no
-- Location: only a 2xx may make it a value
function S.status(r)
  return json(tonumber(r.arg) or 200, { id = "batch_1", object = "batch", status = "completed",
                                        endpoint = "/v1/chat/completions", request_counts = { total = 1 } })
end

-- a file's content, gzip-encoded although nobody asked for it
function S.gzip()
  return reply(200, "\31\139\8\0\0\0\0\0\0\3not really gzip", { ["Content-Encoding"] = "gzip",
                                                               ["Content-Type"] = "application/octet-stream" })
end

-- a file's content that claims more bytes than it sends
function S.short()
  return raw("HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nonly this")
end

-- 200 OK {} to anything: counts requests
function S.count() return reply(200, "{}") end

------------------------------------------------------------------ replay

-- The real service's recorded answers (spec/fixtures/recorded), byte for
-- byte with their status and content type, for the request that matches a
-- recorded one (method, path, and query as a set of fields).
local RECORDED = debug.getinfo(1, "S").source:match("^@(.*)/hostile/[^/]*$") .. "/fixtures/recorded/dashscope/"

local function read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

local function request_key(method, target)
  local path, query = target:match("^([^?]*)%??(.*)$")
  local fields = {}
  for pair in query:gmatch("[^&]+") do fields[#fields + 1] = ngx.unescape_uri(pair) end
  table.sort(fields)
  return method .. " " .. path:gsub("^/compatible%-mode", "") .. "?" .. table.concat(fields, "&")
end

local recorded
local function exchanges()
  if recorded then return recorded end
  recorded = {}
  local p = io.popen("ls " .. RECORDED)
  for name in p:lines() do
    local base = name:match("^(.*)%.request%.header%.txt$")
    if base then
      local first = read(RECORDED .. name):match("^[^\r\n]*")
      local method, target = first:match("^(%u+) (%S+)")
      target = target:gsub("^https?://[^/]+", "")
      local head = read(RECORDED .. base .. ".response.header.txt")
      recorded[request_key(method, target)] = {
        status = tonumber(head:match("^HTTP/%S+ (%d+)")) or 200,
        type = head:match("\n[Cc]ontent%-[Tt]ype: *([^\r\n]+)"),
        body = read(RECORDED .. base .. ".response.body.txt"),
      }
    end
  end
  p:close()
  return recorded
end

function S.replay()
  local target = ngx.var.request_uri:gsub("^/s/replay", "")
  local e = exchanges()[request_key(ngx.req.get_method(), target)]
  if not e then return reply(404, '{"error":{"message":"nothing recorded for ' .. request_key(ngx.req.get_method(), target) .. '"}}') end
  ngx.req.read_body()
  ngx.status = e.status
  ngx.header["Content-Type"] = e.type          -- nil: none, as recorded
  ngx.header["Content-Length"] = #e.body
  ngx.print(e.body)
  return ngx.exit(e.status)
end

------------------------------------------------------------------ random

-- An answer drawn from ARG (a seed): a status, then a body of random
-- bytes or a random JSON shape, sometimes with odd headers.
local SHAPES = {
  function() return "" end,
  function() return "null" end,
  function() return "[]" end,
  function() return "{}" end,
  function() return '{"data":null,"has_more":true,"last_id":null}' end,
  function() return '{"data":[1,"x",null,{}],"has_more":"yes"}' end,
  function() return '{"error":null}' end,
  function() return '{"error":{"message":null,"code":[],"param":{}}}' end,
  function() return '{"id":5,"status":[],"request_counts":"many","output_file_id":{}}' end,
  function() return '{"status":"completed","request_counts":{"total":-1,"completed":1e308}}' end,
  function(r) return '{"error":{"message":"' .. r.key .. '"}}' end,
  function() return ("["):rep(5000) end,
  function() return '{"a":' .. ("1"):rep(400) .. '}' end,
  function() return "\0\1\2\255\254" end,
}

function S.random(r)
  local seed = tonumber(r.arg) or 1
  math.randomseed(seed)
  local statuses = { 200, 200, 200, 201, 204, 301, 400, 401, 404, 409, 429, 500, 502, 503 }
  local status = statuses[math.random(#statuses)]
  local body
  if math.random() < 0.25 then
    local t = {}
    for i = 1, math.random(0, 300) do t[i] = string.char(math.random(0, 255)) end
    body = table.concat(t)
  else
    body = SHAPES[math.random(#SHAPES)](r)
  end
  local headers = {}
  if math.random() < 0.3 then headers["Retry-After"] = tostring(math.random(-5, 3)) end
  if math.random() < 0.2 then headers["x-request-id"] = r.key end
  if status == 204 then body = "" end
  return reply(status, body, headers)
end

------------------------------------------------------------------ dispatch

function M.handle()
  local uri = ngx.var.uri
  if uri == "/_hostile/stats" then
    if ngx.req.get_method() == "DELETE" then dict:flush_all() return reply(200, "{}") end
    local t = {}
    for _, k in ipairs(dict:get_keys(0)) do t[k] = dict:get(k) end
    return json(200, next(t) and t or { none = 0 })
  end
  local name, arg = uri:match("^/s/([%w_]+)%-?([%w.]*)/")
  local fn = name and S[name]
  if not fn then return reply(404, '{"error":{"message":"no such scenario"}}') end
  dict:incr("requests:" .. name, 1, 0)
  dict:incr(ngx.req.get_method() .. " " .. uri:gsub("^/s/[^/]+", ""), 1, 0)
  local h = ngx.var.http_authorization or ""
  local r = { key = h:match("^Bearer%s+(.-)%s*$") or "", arg = arg }
  return fn(r)
end

return M
