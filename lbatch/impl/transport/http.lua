--- The transport: one API call from request to value, with retries.
--
-- It builds the request (URL, query, headers, body or form), hands it to
-- the loop, maps the answer to a value or an error object, honours
-- Retry-After and retries what is worth retrying. A client's methods are
-- a few lines each on top of `transport:call`. Every string that came
-- from the network is scrubbed of the client's secrets before anything
-- reads it, so an echoed key reaches no error, log, journal or output.
-- @module lbatch.impl.transport.http
local json = require "lbatch.json"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"
local now = require("lbatch.core").now

local M = {}

-- ------------------------------------------------------------ requests

local function pct(c) return ("%%%02X"):format(c:byte()) end

--- Percent-encode a string for a URL (RFC 3986 unreserved kept).
-- @tparam string s
-- @treturn string
function M.urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", pct))
end

--- A query string of every parameter given (sorted, so requests are
-- stable): a list value becomes a comma-separated one, `false`/`nil` are
-- left out.
-- @tparam ?table params
-- @treturn string "" or "?k=v&..."
function M.query(params)
  if params == nil then return "" end
  local keys = {}
  for k, v in pairs(params) do
    if type(k) == "string" and v ~= nil and v ~= false then keys[#keys + 1] = k end
  end
  table.sort(keys)
  local q = {}
  for _, k in ipairs(keys) do
    local v = params[k]
    if type(v) == "table" then
      local parts = {}
      for i, x in ipairs(v) do parts[i] = tostring(x) end
      v = table.concat(parts, ",")
    end
    q[#q + 1] = M.urlencode(k) .. "=" .. M.urlencode(v)
  end
  return #q > 0 and ("?" .. table.concat(q, "&")) or ""
end

--- An id for a URL path: a non-empty string with no `/`, no control
-- character and not a dot segment (`.` or `..` would reach another route).
-- @tparam string fn the public function, for the error
-- @tparam string name the argument's name
-- @param id the id
-- @return the encoded id, or nil and an `invalid` error
function M.path_id(fn, name, id)
  errors.check(fn, name, id, "string")
  if id == "" or id == "." or id == ".." or id:find("[/%c\\?#%%]") then
    return nil, errors.new({ kind = "invalid", code = "invalid_id", param = name,
      message = ("%s: %q is not a valid id"):format(fn, id) })
  end
  return M.urlencode(id)
end

-- ------------------------------------------------------------ answers

--- Response headers as a table of lowercased names (the last value wins).
-- @tparam string raw the header block
-- @treturn table
function M.parse_headers(raw)
  local h = {}
  for name, value in (raw or ""):gmatch("([%w%-]+):[ \t]*([^\r\n]*)") do
    h[name:lower()] = value
  end
  return h
end

--- Seconds the server asked us to wait (`retry-after-ms`, `retry-after`
-- in seconds or as an HTTP date), or nil.
-- @tparam table h parsed headers
-- @treturn ?number
function M.retry_after(h)
  local ms = tonumber(h["retry-after-ms"] or "")
  if ms and ms == ms then return math.max(0, ms / 1000) end
  local ra = h["retry-after"]
  if not ra then return nil end
  local s = tonumber(ra)
  if s and s == s then return math.max(0, s) end
  local at = service.http_date(ra)
  if at then return math.max(0, at - os.time()) end
end

-- curl result codes that are worth another attempt
local RETRY_CURL = { [5] = true, [6] = true, [7] = true, [16] = true, [18] = true, [28] = true,
                     [35] = true, [52] = true, [55] = true, [56] = true, [65] = true, [92] = true }
-- ... and those after which the request surely never reached the server
local NOT_SENT = { [5] = true, [6] = true, [7] = true, [35] = true }
-- TLS certificate problems: never fixed by trying again
local CERT = { [51] = true, [58] = true, [60] = true, [77] = true, [82] = true, [83] = true,
               [90] = true, [91] = true, [98] = true }

-- our own failures: name -> { kind, code, retryable } (lbatch/core/fail.c)
local FAIL = require("lbatch.core").FAIL

local function request_id(h, body)
  local id = type(body) == "table" and body.request_id
  if type(id) ~= "string" then id = h["x-request-id"] or h["x-dashscope-request-id"] or h["req-id"] end
  return id
end

-- the error of a transfer that got no usable answer
local function transport_error(res)
  local f = res.fail and FAIL[res.fail]
  if f then
    return errors.new({ kind = f.kind, code = f.code, retryable = f.retryable,
                        status = res.status ~= 0 and res.status or nil, message = res.error })
  end
  local code = res.code
  if res.connect_code == 407 then
    return errors.new({ kind = "network", code = "proxy_auth_required",
      message = "the proxy asks for authentication (407): give its credentials in the proxy URL" })
  end
  if CERT[code] then
    return errors.new({ kind = "network", code = "tls_certificate", message = "TLS certificate problem: "
      .. tostring(res.error) .. " (cainfo, capath, SSL_CERT_FILE or CURL_CA_BUNDLE name the CA)" })
  end
  local kind = code == 28 and "timeout" or code == 42 and "cancelled" or "network"
  return errors.new({ kind = kind, code = "curl_" .. code, message = res.error,
                      retryable = RETRY_CURL[code] or false, not_sent = NOT_SENT[code] or false })
end

-- the error of an answer with a status that is not 2xx: OpenAI's
-- {error: {...}}, a flat {code, message} (DashScope, SiliconFlow's
-- {code, message, data}) or {detail} (a FastAPI proxy)
local function http_error(res, h)
  local body = res.body and json.object(res.body) or {}
  local e = type(body.error) == "table" and body.error or body
  if type(body.error) == "string" and e.message == nil then e = { message = body.error, code = body.code } end
  local message = e.message
  if message == nil and type(body.detail) == "string" then message = body.detail end
  if type(e.code) == "number" then e.code = tostring(math.tointeger and math.tointeger(e.code) or e.code) end
  if type(message) ~= "string" then
    local text = (res.body or ""):gsub("%s+", " ")
    message = ("HTTP %d%s"):format(res.status, text ~= "" and (": " .. text:sub(1, 200)) or "")
  end
  local s = res.status
  return errors.new({
    kind = "http", status = s, message = message:sub(1, 2000), code = e.code, type = e.type, param = e.param,
    request_id = request_id(h, body),
    -- an account that cannot pay is not helped by asking again (429 insufficient_quota)
    retryable = (s == 408 or s == 409 or s == 429 or s >= 500) and not service.ACCOUNT[e.code],
    retry_after = M.retry_after(h),
  })
end

-- ------------------------------------------------------------ one shape

local TIME = { created_at = true, in_progress_at = true, expires_at = true, finalizing_at = true,
               completed_at = true, failed_at = true, expired_at = true, cancelling_at = true,
               cancelled_at = true, job_deadline = true }
local ID = { id = true, input_file_id = true, output_file_id = true, error_file_id = true }

-- a time in any form as whole seconds (nil when it cannot be read)
local function seconds(v)
  if type(v) == "number" then return math.floor(v) end
  if type(v) == "string" then
    local n = tonumber(v)
    if n then return math.floor(n) end
    return service.iso8601(v)
  end
end

--- One object of any provider in OpenAI's shape, in place: the status
-- lower case on OpenAI's names (the provider's own kept as `raw_status`
-- when it differs), every `*_at` time as integer seconds (ISO-8601
-- strings read), `""` ids as nil, `request_counts` always a table of
-- whole numbers (zeros where the provider gives `progress`, null fields
-- or nothing), Together's `model_id` as `model`.
-- @tparam table v a decoded batch or file (nulls already nil)
-- @tparam[opt] table answers the provider's `answers` (see `lbatch.service.PROVIDERS`)
-- @treturn table v
function M.normalise_object(v, answers)
  answers = answers or {}
  for k in pairs(ID) do if v[k] == "" then v[k] = nil end end
  for k in pairs(TIME) do
    if v[k] ~= nil then v[k] = seconds(v[k]) end
  end
  local st = v.status
  if type(st) == "string" then
    local low = st:lower()
    local name = (answers.statuses and answers.statuses[low]) or low
    if name ~= st then v.raw_status = st end
    v.status = name
  end
  local is_batch = v.object == "batch" or v.input_file_id ~= nil and v.endpoint ~= nil
  if is_batch then
    local c = type(v.request_counts) == "table" and v.request_counts or {}
    for _, k in ipairs({ "total", "completed", "failed" }) do
      if type(c[k]) ~= "number" then c[k] = 0 end
    end
    v.request_counts = c
  end
  if v.model == nil and type(v.model_id) == "string" then v.model = v.model_id end
  if is_batch and v.object == nil then v.object = "batch" end
  return v
end

--- An answer of any provider in one shape (see `normalise_object`): a
-- wrapped object unwrapped (Together's create `{job, warning}`, the
-- warning kept), a bare array as a page (`{object = "list", data = [...],
-- has_more = false}`), a page's data always a list of objects.
-- @param v the decoded answer (nulls already nil)
-- @tparam[opt] table answers the provider's `answers`
-- @tparam[opt] boolean list the answer is a page
-- @treturn table the answer
function M.normalise(v, answers, list)
  answers = answers or {}
  if list or v[1] ~= nil or (next(v) == nil and answers.list == "array") then
    if v.data == nil and (v[1] ~= nil or next(v) == nil) then
      v = { object = "list", data = v, has_more = false }
    end
    local data, src, n = {}, type(v.data) == "table" and v.data or {}, 0
    for k in pairs(src) do if type(k) == "number" and k > n then n = k end end   -- nulls made holes
    for i = 1, n do
      if type(src[i]) == "table" then data[#data + 1] = M.normalise_object(src[i], answers) end
    end
    v.data = data
    if v.has_more == nil then v.has_more = false end
    return v
  end
  local wrap = answers.unwrap
  if wrap and type(v[wrap]) == "table" and v.id == nil then
    local inner = v[wrap]
    if inner.warning == nil then inner.warning = v.warning end
    v = inner
  end
  return M.normalise_object(v, answers)
end

--- Map a transfer's result to a value, or nil and an error object.
-- @tparam table res the core's result
-- @tparam table o the call's options (raw: the body as a string; list: a
-- page; answers: the provider's normalisation, see `normalise`; redirect:
-- a 3xx answer is a value, its headers)
-- @treturn value or nil
-- @treturn ?table the error
-- @treturn table meta: status, headers, request_id, version
function M.answer(res, o)
  local h = M.parse_headers(res.headers)
  local meta = { status = res.status, headers = h, version = res.version, time = res.time }
  if res.fail or res.code ~= 0 then return nil, transport_error(res), meta end
  local moved = o.redirect and res.status >= 300 and res.status < 400
  if (res.status < 200 or res.status >= 300) and not moved then
    local err = http_error(res, h)
    meta.request_id = err.request_id
    return nil, err, meta
  end
  meta.request_id = request_id(h)
  if moved then return h, nil, meta end
  if res.path then return res.path, nil, meta end
  if o.raw then return res.body or "", nil, meta end
  local body = res.body or ""
  if body:sub(1, 3) == "\239\187\191" then body = body:sub(4) end   -- a BOM, as DashScope's file lists have
  local v, why = json.object(body)
  if not v and o.list and body:match("^%s*%[") then      -- a bare array (Together's lists)
    local ok, arr = pcall(json.decode, body)
    if ok and type(arr) == "table" then v, why = arr, nil end
  end
  if not v then
    return nil, errors.new({ kind = "decode", status = res.status, code = "invalid_json", request_id = meta.request_id,
      message = ("the answer is not a JSON object (%s): %s"):format(why, (res.body or ""):sub(1, 120)) }), meta
  end
  -- a page's data is always a list of objects (the dashscope dialect
  -- sends null for none; what is not an object is dropped)
  v = M.normalise(json.normalize(v), o.answers, o.list)
  -- an error in a 2xx answer's envelope ({code, message, data: null}, as
  -- SiliconFlow words its errors)
  if not o.list and v.id == nil and v.object == nil and v.code ~= nil and type(v.message) == "string"
      and v.data == nil and v.deleted == nil then
    return nil, errors.new({ kind = "http", status = res.status, code = tostring(v.code), message = v.message,
                             request_id = meta.request_id }), meta
  end
  return v, nil, meta
end

-- ------------------------------------------------------------ the transport

local Transport = {}
Transport.__index = Transport

--- A transport for one client.
-- @tparam table cfg the configuration (lbatch.config)
-- @tparam table secrets key, headers, list
-- @tparam table loop the client's loop
-- @treturn table
function M.new(cfg, secrets, loop)
  local json_headers = { "Content-Type: application/json" }
  for i, h in ipairs(secrets.headers) do json_headers[i + 1] = h end
  local p = service.PROVIDERS[cfg.provider or "dashscope"]
  return setmetatable({ cfg = cfg, loop = loop, headers = secrets.headers, json_headers = json_headers,
                        answers = p and p.answers or {},
                        scrub = errors.scrubber(secrets.list) }, Transport)
end

-- the spec of one attempt
function Transport:spec(method, path, o)
  local cfg = self.cfg
  -- another host's URL (a presigned one) gets none of the client's headers: no key
  -- (o.keyed: a URL its caller checked is the provider's own, Batch Chat's)
  local headers = o.url and not o.keyed and {} or o.body and self.json_headers or self.headers
  if o.headers then
    local all = {}
    for i, v in ipairs(headers) do all[i] = v end
    for _, v in ipairs(o.headers) do all[#all + 1] = v end
    headers = all
  end
  local timeout = o.timeout or (o.stream and (cfg.transfer_timeout or 0) or cfg.timeout)
  local url = o.url
  if not url then
    url = cfg.base_url .. path .. (cfg.query and ((path:find("?", 1, true) and "&" or "?") .. cfg.query) or "")
  end
  return {
    url = url,
    method = method, headers = headers,
    body = o.body, form = o.form, upload = o.upload, download = o.download, identity = o.identity,
    cainfo = cfg.cainfo, capath = cfg.capath, proxy = cfg.proxy, noproxy = cfg.noproxy,
    connect_timeout = cfg.connect_timeout * 1000, timeout = timeout * 1000,
    stall = (o.stall or cfg.stall_timeout) * 1000,
    max_body = cfg.max_response_bytes,
  }
end

-- scrub what came from the network, unless it is a file's bytes
function Transport:clean(res, raw_ok)
  local scrub = self.scrub
  res.headers = scrub(res.headers)
  if res.error then res.error = scrub(res.error) end
  local keep = raw_ok and res.status >= 200 and res.status < 300
  if res.body and not keep then res.body = scrub(res.body) end
  return res
end

--- Backoff before attempt `attempt + 1`: the server's Retry-After, else
-- 0.5 s doubling up to 8 s, with jitter.
function Transport.backoff(_, attempt, err)
  if err.retry_after then return err.retry_after end
  local base = math.min(8, 0.5 * 2 ^ attempt)
  return base * (0.75 + 0.25 * math.random())
end

-- A "not there" answer: 404, or a 400 that says so (DashScope and
-- OpenAI answer a create from an unknown file with 400 "... not found" /
-- "Cannot find file ...").
local function not_found(err)
  if err.status == 404 then return true end
  if err.status ~= 400 then return false end
  local text = ((err.code or "") .. " " .. (err.message or "")):lower()
  return text:find("not[ _]found") ~= nil or text:find("cannot find", 1, true) ~= nil
    or text:find("does not exist", 1, true) ~= nil or text:find("no such", 1, true) ~= nil
end
M.not_found = not_found

local function remove_partial(_, path) os.remove(path) end

-- the spec of an attempt that resumes a cut download from its temp file
local function resumed(spec, partial, bytes)
  local again = {}
  for k, v in pairs(spec) do again[k] = v end
  local headers = {}
  for i, h in ipairs(spec.headers) do headers[i] = h end
  headers[#headers + 1] = ("Range: bytes=%d-"):format(bytes)
  again.headers, again.resume = headers, partial
  return again
end

-- One attempt: the value, or nil and the error; then meta, the core's
-- result (nil when a local file failed it) and the kept partial download.
local function once(self, spec, o, partial)
  local res, fail, message = self.loop:transfer(spec, o.on_progress)
  local value, err, meta
  if res then
    if o.answers == nil then o.answers = self.answers end
    value, err, meta = M.answer(self:clean(res, o.raw or o.download), o)
    if res.partial then partial = res.partial end
    -- asked for a range past the end (or the server refused it): from byte 0
    if spec.resume and res.status == 416 and partial then
      os.remove(partial)
      partial, err.retryable = nil, true
    end
  else
    err = errors.new({ kind = fail == "io" and "io" or "invalid", message = message })
  end
  return value, err, meta, res, partial
end

-- The attempts after a first one that failed (see call).
local function retry(self, o, base, err, meta, res, partial)
  local cfg, loop = self.cfg, self.loop
  local max_retries = o.max_retries or cfg.max_retries
  local attempt, waited = 0, 0
  while true do
    errors.scrub(err, self.scrub)
    local fresh = o.fresh_until and not err.retryable and not_found(err) and now() < o.fresh_until
    if not fresh and (not err.retryable or attempt >= max_retries) then
      if partial then os.remove(partial) end
      return nil, err, meta
    end
    local wait
    if fresh then
      wait = math.min(self:backoff(waited, err), math.max(0.05, o.fresh_until - now()))
      waited = waited + 1
    else
      wait = self:backoff(attempt, err)
      if wait > cfg.retry_after_cap then
        if partial then os.remove(partial) end
        return nil, err, meta
      end
    end
    -- a cancel during the wait removes the kept temp file
    if partial then loop:sleep(wait, remove_partial, partial) else loop:sleep(wait) end
    if o.recover and not err.not_sent and not fresh then
      local found, stop = o.recover(err)
      if found ~= nil then return found, nil, meta end
      if stop then return nil, err, meta end
    end
    local spec = base
    if partial then
      local bytes = res and res.partial == partial and res.partial_bytes
      spec = bytes and resumed(base, partial, bytes) or base
      if not bytes then os.remove(partial) partial = nil end
    end
    if not fresh then attempt = attempt + 1 end
    local value
    value, err, meta, res, partial = once(self, spec, o, partial)
    if value ~= nil then return value, nil, meta end
  end
end

--- One API call with retries.
-- A cut download goes on from the bytes already on disk (`Range`, the
-- temp file kept between attempts and removed however the call ends).
-- With `fresh_until` (the id was made by this client a moment ago), a
-- "not there" answer is retried until that time, as the service's
-- listings catch up, and these retries do not count against max_retries.
-- @tparam string method
-- @tparam string path the path after the base URL, query included
-- @tparam table o body (JSON string), form, upload (a path: the whole
-- body, streamed), url (absolute, instead of the base URL and path: sent
-- with o.headers only, never the key), redirect (a 3xx answer's headers
-- are the value), download (a path), raw (the
-- body as a string), identity (a file's bytes), stream (no whole-request
-- timeout), timeout (s), max_retries, headers (lines), on_progress(done,
-- total, direction), recover(err) -> value | nil, stop, fresh_until (a
-- `core.now()` time), stall (s with no byte moved that fail the transfer;
-- default stall_timeout)
-- @return the value, or nil and an error object; then meta
function Transport:call(method, path, o)
  local base = self:spec(method, path, o)
  if o.download then base.keep_partial = true end
  -- the first attempt apart from the retries' loop: most calls end there,
  -- and LuaJIT's trace of a call then meets no inner loop (which aborted it)
  local value, err, meta, res, partial = once(self, base, o, nil)
  if value ~= nil then return value, nil, meta end
  return retry(self, o, base, err, meta, res, partial)
end

return M
