--- The API reference shows the client in `lbatch`'s page (config.ld).
-- @module lbatch

--- The client: every Batch and File operation of one service and key.
--
-- Each operation returns its value, or nil and an error object (see
-- `lbatch.errors`). Inside a task it yields while its transfer runs, so
-- tasks overlap; outside any task it waits (see `lbatch.loop`). Its
-- transfers run on a scheduler (`lbatch.scheduler`): its own, or one it
-- shares with other clients (`scheduler = sched`).
--
-- The six of the design: `upload` (a file), `create` (a batch), `retrieve`
-- (a batch), `list` (a page of batches; also named `list_batches`),
-- `cancel` (a batch) and `content` (a file's bytes); beside them files,
-- pages, waits and notices.
--
-- Every operation takes its API parameters (sent as given: a field the
-- service adds tomorrow needs no new lbatch) and, last, per-call options:
--
--    timeout        seconds for this call (default: the client's)
--    max_retries    retries for this call
--    headers        extra headers, {Name = "value"}
--    with_response  true: return value, response ({status, request_id,
--                   headers, version}) on success (nil, err, response on
--                   a failure with an answer)
-- @type Client
local json = require "lbatch.json"
local config = require "lbatch.impl.api.config"
local http = require "lbatch.impl.transport.http"
local Scheduler = require "lbatch.impl.transport.scheduler"
local watch = require "lbatch.impl.api.watch"
local recover = require "lbatch.impl.api.recover"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"

local check, argerr = errors.check, errors.arg
local now = require("lbatch.core").now

local Client = { VERSION = require "lbatch.impl.transport.version", REGIONS = service.REGIONS, FINAL = service.FINAL }
Client.__index = Client

-- a client's transport (which holds the key) lives here, not in the
-- client table, so printing or dumping a client never shows the key
local transports = setmetatable({}, { __mode = "k" })

local function transport(self)
  local t = transports[self]
  if not t then argerr("client", "the client is closed", 4) end
  return t
end

-- A connection failure (no answer: kind network or timeout) names the
-- provider and the host it was trying: a key sent to the wrong place shows.
local function located(call, cfg)
  return function(t, method, path, o)
    local value, err, meta = call(t, method, path, o)
    if value == nil and errors.is(err) and (err.kind == "network" or err.kind == "timeout")
      and not err.status and not err.host then
      local url = o and o.url or cfg.base_url
      local host = url:match("^%a[%w+.-]*://([^/?#]*)") or url
      err.provider, err.host = cfg.provider, host:gsub("^.*@", "")
      err.message = ("%s (provider %s, host %s)"):format(tostring(err.message), err.provider, err.host)
    end
    return value, err, meta
  end
end

-- LBATCH_NO_DUMP=1: the process that makes a client (and so holds its key)
-- is made non-dumpable: no core dump, no ptrace by the same user, no
-- /proc/PID/mem. For the rest of the process's life: the key's bytes may
-- stay in freed memory after the client closes. nil, or a config error
-- when the system cannot do it (asked for, not silently skipped).
local function no_dump()
  local want = os.getenv("LBATCH_NO_DUMP")
  if want == nil or want == "" or want == "0" then return nil end
  local ok, why = require("lbatch.core").dumpable(false)
  if ok == false then return nil end
  return errors.new({ kind = "config", code = "no_dump", message = "LBATCH_NO_DUMP is set but the process "
    .. "cannot be made non-dumpable: " .. tostring(why or "still dumpable") })
end

--- Make a client.
-- Without provider, region or api_key, the provider is the one whose key
-- variable is set (OPENAI_API_KEY: openai, ...); with several, DashScope
-- with its own key, said in `client.config.warning` (see `lbatch.config`).
-- @tparam[opt] table opts api_key, provider, region (`cn`, `intl`, `openai`),
-- workspace (a DashScope workspace ID, with region: its domain,
-- `https://{ID}.ap-southeast-1.maas.aliyuncs.com` for `intl`,
-- `https://{ID}.cn-beijing.maas.aliyuncs.com` for `cn`), base_url,
-- limits, poll_budget, timeout, connect_timeout, stall_timeout,
-- transfer_timeout, max_retries, retry_after_cap, max_response_bytes,
-- headers, cainfo, capath, proxy, noproxy, allow_http, fresh_window (30: seconds
-- an id this client made is asked for again when the service says it is
-- not there yet); and scheduler (a
-- `lbatch.scheduler` to share), or the options of a scheduler of its own:
-- max_connections, max_streams, host (see `lbatch.loop`). Raises when an
-- option is wrong or unknown (a misspelt one).
-- With `LBATCH_NO_DUMP=1` in the environment the process is made
-- non-dumpable (no core dump holds the key) for the rest of its life.
-- @treturn lbatch.client, or nil and an error (kind `config`) when no key
-- is found, or LBATCH_NO_DUMP cannot be honoured
function Client.new(opts)
  local cfg, secrets = config.new(opts or {})
  if not cfg then
    if errors.is(secrets) then return nil, secrets end
    argerr("new", secrets)
  end
  local dump_err = no_dump()
  if dump_err then return nil, dump_err end
  local sched = opts and opts.scheduler
  if sched ~= nil and not Scheduler.is(sched) then
    argerr("new", "scheduler must be a scheduler (lbatch.scheduler())")
  end
  local own = sched == nil
  if own then
    sched = Scheduler.new({ host = cfg.host, max_connections = cfg.max_connections, max_streams = cfg.max_streams })
  end
  local self = setmetatable({ base_url = cfg.base_url, region = cfg.region, config = cfg, scheduler = sched,
                              provider = service.PROVIDERS[cfg.provider or "dashscope"],
                              -- dashscope or openai (every other provider speaks OpenAI's)
                              dialect = cfg.provider == "dashscope" and "dashscope" or "openai",
                              own_scheduler = own, fresh = {}, nfresh = 0 }, Client)
  local t = http.new(cfg, secrets, sched.loop)
  t.call = located(t.call, cfg)
  transports[self] = t
  return self
end

-- ------------------------------------------------------------ calls

local CALL = { timeout = "number", max_retries = "number", headers = "table", with_response = "boolean",
               on_progress = "function" }

-- per-call options, checked, as transport options
local function call_options(fn, opts, o)
  o = o or {}
  if opts == nil then return o end
  check(fn, "opts", opts, "table")
  for k, want in pairs(CALL) do
    local v = opts[k]
    if v ~= nil then
      if type(v) ~= want then argerr(fn, ("opts.%s must be a %s"):format(k, want)) end
      if want == "number" and (v ~= v or v < 0 or v == math.huge) then
        argerr(fn, ("opts.%s must be a number >= 0"):format(k))
      end
    end
  end
  o.timeout, o.max_retries = opts.timeout, opts.max_retries
  if opts.headers then
    local lines, why = config.headers(opts.headers)
    if not lines then argerr(fn, "opts." .. why, 4) end
    o.headers = lines
  end
  o.with_response = opts.with_response
  return o
end

local function finish(o, value, err, meta)
  if o.with_response then
    if value ~= nil then return value, meta end
    return nil, err, meta
  end
  return value, err
end

function Client:_call(method, path, o)
  return finish(o, transport(self):call(method, path, o))
end

-- Ids this client made a moment ago (fresh_window seconds): the service
-- may not list them yet, so "not there" is asked again (see http).
function Client:_made(id)
  if type(id) ~= "string" or self.config.fresh_window <= 0 then return end
  local t = now()
  if self.nfresh >= 1024 then             -- bounded: the expired ones go
    local n = 0
    for k, until_t in pairs(self.fresh) do
      if until_t <= t then self.fresh[k] = nil else n = n + 1 end
    end
    self.nfresh = n
  end
  if not self.fresh[id] then self.nfresh = self.nfresh + 1 end
  self.fresh[id] = t + self.config.fresh_window
end

-- the call's options for an id: fresh_until while the id is fresh
local function fresh(self, id, o)
  local until_t = self.fresh[id]
  if until_t and until_t > now() then o.fresh_until = until_t end
  return o
end

local function made(self, value, err, meta)
  if value ~= nil and type(value) == "table" then self:_made(value.id) end
  return value, err, meta
end

local function id_path(fn, name, id, fmt)
  local enc, err = http.path_id(fn, name, id)
  if not enc then return nil, err end
  return fmt:format(enc)
end

-- ------------------------------------------------------------ files

local function basename(p) return (p:match("([^/\\]+)$")) or p end

local file_size = require("lbatch.impl.formats.size").file

-- form fields of every parameter given: nested tables as key[sub]
local function form_fields(out, prefix, v)
  if type(v) == "table" then
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for _, k in ipairs(keys) do
      local x = v[k]
      if x == nil then x = v[tonumber(k)] end
      form_fields(out, prefix .. "[" .. k .. "]", x)
    end
  elseif v ~= nil and v ~= false then
    out[#out + 1] = { name = prefix, value = tostring(v) }
  end
end

-- what recovery lists with: the transport's own call, not the client's
local function lister(t, path)
  return function(q) return t:call("GET", path .. http.query(q), { list = true }) end
end

-- Together's upload, in three steps (service.PROVIDERS.together.upload =
-- "presigned"; together-ai 0.52.0 src/lib/upload.ts, together-py
-- src/together/lib/resources/files.py UploadManager): POST /files
-- {purpose, file_name, file_type} answers 302 with a presigned Location
-- and X-Together-File-Id; the bytes are PUT there, streamed from disk, with
-- none of the client's headers (the URL is signed: the key goes to no
-- other host); POST /files/{id}/preprocess answers the file. Each step is
-- retried as any call; the PUT may be sent again (it replaces).
local FILE_TYPES = { jsonl = true, parquet = true, csv = true }

-- one step's transport options: the call's, and the step's own
local function step(o, own)
  local s = { headers = o.headers, timeout = o.timeout, max_retries = o.max_retries }
  for k, v in pairs(own) do s[k] = v end
  return s
end

local function presigned(self, t, part, params, o)
  local req = { purpose = params.purpose or self.provider.purpose, file_name = part.filename }
  for k, v in pairs(params) do if k ~= "filename" and req[k] == nil then req[k] = v end end
  if req.file_type == nil then
    local ext = (part.filename:match("%.(%w+)$") or ""):lower()
    req.file_type = FILE_TYPES[ext] and ext or "jsonl"
  end
  local at, err, meta = t:call("POST", "/files", step(o, { body = json.encode(req), redirect = true }))
  if not at then return nil, err, meta end
  local url, id = at.location, at["x-together-file-id"]
  local scheme = url and url:match("^(https?)://[^/]")
  if not (scheme and id and id ~= "") or (scheme == "http" and self.base_url:match("^https:")) then
    return nil, errors.new({ kind = "http", status = meta.status, code = "invalid_upload_url",
      request_id = meta.request_id, message = ("POST /files answered %d without a usable upload URL: Together's "
        .. "upload needs an https Location and an X-Together-File-Id"):format(meta.status) }), meta
  end
  local _, perr, pmeta = t:call("PUT", nil, { url = url, upload = part.file, body = part.value, stream = true,
    raw = true, on_progress = o.on_progress, max_retries = o.max_retries, timeout = o.timeout,
    headers = { "Content-Type: application/octet-stream" } })
  if perr then return nil, perr, pmeta end
  return t:call("POST", ("/files/%s/preprocess"):format(http.urlencode(id)),
    step(o, { fresh_until = now() + math.max(self.config.fresh_window, 1) }))
end

--- Upload a file (streamed from disk) or bytes made in memory.
-- For Together (`provider = "together"`) in its three steps: a presigned
-- URL, the bytes PUT there, then preprocess (the purpose defaults to
-- `"batch-api"`; `file_type` from the name's extension).
-- @param file a path, or `{data = string, filename = string}`
-- @tparam[opt] table params form fields, all sent: purpose (default
-- `"batch"`), filename, expires_after = {anchor = "created_at", seconds = N}
-- (N from 3600 to 2592000; OpenAI's default: a `batch` file expires after
-- 30 days, openai npm 6.49.0 resources/files.d.ts FileCreateParams; sent as
-- the form fields `expires_after[anchor]` and `expires_after[seconds]`;
-- DashScope documents no such field)
-- @tparam[opt] table opts per-call options, and on_progress(sent, total)
-- @treturn table the file object, or nil and an error
function Client:upload(file, params, opts)
  params = check("upload", "params", params, "table", true) or {}
  check("upload", "params.expires_after", params.expires_after, "table", true)
  local o = call_options("upload", opts, { stream = true })
  local part, name, bytes
  if type(file) == "string" then
    name = basename(file)
    part = { name = "file", file = file, type = "application/octet-stream" }
  elseif type(file) == "table" then
    check("upload", "file.data", file.data, "string")
    check("upload", "file.filename", file.filename, "string")
    name, bytes = file.filename, #file.data
    part = { name = "file", value = file.data, stream = true, type = "application/octet-stream" }
  else
    argerr("upload", "file must be a path or {data = ..., filename = ...}")
  end
  check("upload", "params.filename", params.filename, "string", true)
  check("upload", "params.purpose", params.purpose, "string", true)
  part.filename = params.filename or name
  if opts and opts.on_progress then
    local fn = opts.on_progress
    o.on_progress = function(up, total) fn(up, total) end
  end
  local t = transport(self)
  if self.provider.upload == "presigned" then return finish(o, made(self, presigned(self, t, part, params, o))) end
  local form = { { name = "purpose", value = params.purpose or "batch" } }
  for k, v in pairs(params) do
    if k ~= "purpose" and k ~= "filename" and type(k) == "string" then form_fields(form, k, v) end
  end
  table.sort(form, function(a, b) return a.name < b.name end)
  form[#form + 1] = part      -- the file last, as the SDKs send it
  o.form = form
  -- found by its stamps (name, size), not by this machine's clock
  o.recover = function()
    local size = bytes or file_size(file)
    if not size then return nil, true end
    local found, lerr = recover.upload(lister(t, "/files"), { filename = part.filename, bytes = size })
    if found then return found end
    return nil, lerr ~= nil         -- cannot tell: do not risk a second file
  end
  return finish(o, made(self, t:call("POST", "/files", o)))
end

local function page(fn, self, path, params, opts)
  check(fn, "params", params, "table", true)
  local o = call_options(fn, opts, { list = true })
  return self:_call("GET", path .. http.query(params), o)
end

--- One page of files.
-- @tparam[opt] table params query fields, all sent: purpose, limit, order, after, ...
-- @tparam[opt] table opts per-call options
-- @treturn table the page (`data` is always a list), or nil and an error
function Client:list_files(params, opts) return page("list_files", self, "/files", params, opts) end

--- A file.
-- @tparam string id
-- @tparam[opt] table opts per-call options
-- @treturn table the file object, or nil and an error
function Client:file(id, opts)
  local path, err = id_path("file", "file_id", id, "/files/%s")
  if not path then return nil, err end
  return self:_call("GET", path, fresh(self, id, call_options("file", opts)))
end

--- Delete a file.
-- @tparam string id
-- @tparam[opt] table opts per-call options
-- @treturn table `{id, object, deleted}`, or nil and an error
function Client:delete_file(id, opts)
  local path, err = id_path("delete_file", "file_id", id, "/files/%s")
  if not path then return nil, err end
  local v, e = self:_call("DELETE", path, fresh(self, id, call_options("delete_file", opts)))
  -- deleted: a 404 for it from now on is the truth, not a service that
  -- has not caught up (a fresh id's 404 would be retried fresh_window s)
  if v and self.fresh[id] then self.fresh[id] = nil self.nfresh = self.nfresh - 1 end
  return v, e
end

--- A file's content: as a string, or streamed to a file.
-- With `opts.path`, the file is written to a temp file beside it and
-- renamed over it only when complete; the path must be a regular file
-- or nothing (a symlink, a directory or a device is refused, `io`).
-- @tparam string id
-- @tparam[opt] table opts path, on_progress(received, total) (total is
-- nil until the answer's headers say it), and per-call options
-- @return the content (a string), or the path; or nil and an error
function Client:content(id, opts)
  local path, err = id_path("content", "file_id", id, "/files/%s/content")
  if not path then return nil, err end
  local o = fresh(self, id, call_options("content", opts, { raw = true, identity = true }))
  local target = opts and opts.path
  check("content", "opts.path", target, "string", true)
  o.download, o.stream = target, target ~= nil
  if opts and opts.on_progress then
    local fn = opts.on_progress
    o.on_progress = function(_, _, down, total) fn(down, total >= 0 and total or nil) end
  end
  return self:_call("GET", path, o)
end

-- ------------------------------------------------------------ real time

--- One request to the service's ordinary real-time endpoint, at full
-- price: a batch line's `url` and `body` sent as they are (POST
-- {base_url}/chat/completions for "/v1/chat/completions", /embeddings for
-- "/v1/embeddings": the line's version segment is the base URL's). Retried
-- as any call (a network failure or a 429/5xx): a real-time request has no
-- idempotency key, so a retried one may be answered, and billed, twice.
-- The answer may be silent until it is whole: only `timeout` bounds it
-- (not `stall_timeout`).
-- @tparam string url a batch line's url ("/v1/chat/completions", ...)
-- @tparam table|string body the request's body (a table is encoded)
-- @tparam[opt] table opts per-call options
-- @treturn table the answer's body (a chat completion, an embedding
-- list), or nil and an error
function Client:request(url, body, opts)
  check("request", "url", url, "string")
  if type(body) ~= "string" and type(body) ~= "table" then argerr("request", "body must be a table or a string") end
  if url:sub(1, 1) ~= "/" or url:find("[%c?#]") or url:find("/%.%.?/") then
    return nil, errors.new({ kind = "invalid", code = "invalid_url", param = "url",
      message = ("request: %q is not a request line's url"):format(url) })
  end
  local o = call_options("request", opts)
  o.body = type(body) == "string" and body or json.encode(body)
  -- a model's answer comes whole at its end: silence until then is no stall
  o.stall = o.timeout or self.config.timeout
  return self:_call("POST", (url:gsub("^/v%d+/", "/", 1)), o)
end

-- ------------------------------------------------------------ batches

--- Create a batch.
-- Never leaves a second batch behind: libcurl cannot re-send the body on
-- its own (lbatch/core/xfer.c), and after an attempt whose outcome is
-- unknown `create` looks for the batch among the newest before sending
-- again.
-- @tparam table params the body, all sent: input_file_id, endpoint,
-- completion_window (default `"24h"`), metadata, output_expires_after =
-- {anchor = "created_at", seconds = N} (N from 3600 to 2592000, anchored
-- at the output file's creation; left out, the output and error files
-- keep the provider's default: OpenAI's batch files, 30 days, openai npm
-- 6.49.0 resources/batches.d.ts BatchCreateParams.OutputExpiresAfter), ...
-- @tparam[opt] table opts per-call options
-- @treturn table the batch, or nil and an error
function Client:create(params, opts)
  check("create", "params", params, "table")
  check("create", "input_file_id", params.input_file_id, "string")
  check("create", "endpoint", params.endpoint, "string")
  check("create", "completion_window", params.completion_window, "string", true)
  check("create", "metadata", params.metadata, "table", true)
  check("create", "output_expires_after", params.output_expires_after, "table", true)
  local req = {}
  for k, v in pairs(params) do req[k] = v end
  req.completion_window = req.completion_window or "24h"
  local o = call_options("create", opts)
  o.body = json.encode(req)
  local t = transport(self)
  -- found by its stamps (input file, endpoint, metadata), not by this machine's clock
  o.recover = function(err)
    if err.status == 429 or err.status == 408 then return nil end
    local found, lerr = recover.batch(lister(t, "/batches"), { input_file_id = req.input_file_id,
      endpoint = req.endpoint, metadata = req.metadata or {} })
    if found then return found end
    return nil, lerr ~= nil         -- cannot tell: do not risk a second batch
  end
  fresh(self, req.input_file_id, o)
  return finish(o, made(self, t:call("POST", "/batches", o)))
end

--- A batch.
-- @tparam string id
-- @tparam[opt] table opts per-call options
-- @treturn table the batch, or nil and an error
function Client:retrieve(id, opts)
  local path, err = id_path("retrieve", "batch_id", id, "/batches/%s")
  if not path then return nil, err end
  return self:_call("GET", path, fresh(self, id, call_options("retrieve", opts)))
end

--- Cancel a batch.
-- @tparam string id
-- @tparam[opt] table opts per-call options
-- @treturn table the batch (cancelling), or nil and an error
function Client:cancel(id, opts)
  local path, err = id_path("cancel", "batch_id", id, "/batches/%s/cancel")
  if not path then return nil, err end
  return self:_call("POST", path, fresh(self, id, call_options("cancel", opts)))
end

--- One page of batches, newest first.
-- @tparam[opt] table params query fields, all sent: after, limit, status,
-- ds_name, input_file_ids (a list), create_after, create_before, ...
-- @tparam[opt] table opts per-call options
-- @treturn table the page (`data` is always a list), or nil and an error
function Client:list_batches(params, opts) return page("list_batches", self, "/batches", params, opts) end

--- One page of batches, as `list_batches` (the design's name, beside
-- upload, create, retrieve, cancel and content).
-- @tparam[opt] table params as `list_batches`
-- @tparam[opt] table opts per-call options
-- @treturn table the page (`data` is always a list), or nil and an error
function Client:list(params, opts) return page("list", self, "/batches", params, opts) end

-- Every item, page after page. A cursor that repeats, or a page that
-- brings nothing new while claiming more, ends it with an error: a server
-- must not keep a caller looping.
local function each(fn, list, self, params, opts)
  check(fn, "params", params, "table", true)
  local q = {}
  for k, v in pairs(params or {}) do q[k] = v end
  local items, i, more, failed = {}, 1, true, false
  local cursors, seen = {}, {}
  return function()
    while i > #items do
      if not more or failed then return nil end
      local p, err = list(self, q, opts)
      if not p then failed = true return false, err end
      local new = {}
      for _, x in ipairs(p.data) do
        if x.id == nil or not seen[x.id] then
          if x.id ~= nil then seen[x.id] = true end
          new[#new + 1] = x
        end
      end
      items, i = new, 1
      more = p.has_more == true
      if more then
        local cursor = p.last_id or (p.data[#p.data] and p.data[#p.data].id)
        if cursor == nil or cursors[cursor] or #new == 0 then
          failed = true
          local e = errors.new({ kind = "decode", code = "pagination_loop", message =
            ("%s: the server says has_more but its cursor %s does not move on"):format(fn, tostring(cursor)) })
          if #new == 0 then return false, e end
          items[#items + 1] = false
          items[#items + 1] = e
        else
          cursors[cursor] = true
          q.after = cursor
        end
      end
    end
    local x = items[i]
    i = i + 1
    if x == false then
      local e = items[i]
      i = #items + 1
      return false, e
    end
    return x
  end
end

--- Every batch, page after page: `for batch, err in client:each_batch{...}`.
-- On a failure the loop sees `batch == false` and the error, then ends.
-- @tparam[opt] table params as `list_batches` (limit is the page size)
-- @tparam[opt] table opts per-call options
-- @treturn function the iterator
function Client:each_batch(params, opts) return each("each_batch", Client.list_batches, self, params, opts) end

--- Every file, page after page: `for file, err in client:each_file{...}`.
-- @tparam[opt] table params as `list_files`
-- @tparam[opt] table opts per-call options
-- @treturn function the iterator
function Client:each_file(params, opts) return each("each_file", Client.list_files, self, params, opts) end

local WAIT = { interval = 60, factor = 1.5, max_interval = 600, jitter = 0.1 }

local function wait_opts(opts)
  check("wait", "opts", opts, "table", true)
  opts = opts or {}
  local o = {}
  for k, default in pairs(WAIT) do
    local v = opts[k]
    if v == nil and k == "interval" then v = tonumber(os.getenv("LBATCH_POLL_INTERVAL") or "") end
    if v == nil then v = default end
    if type(v) ~= "number" or v ~= v or v == math.huge then argerr("wait", "opts." .. k .. " must be a number", 4) end
    o[k] = v
  end
  if o.interval <= 0 or o.max_interval <= 0 then
    argerr("wait", "opts.interval and opts.max_interval must be > 0", 4)
  end
  if o.factor < 1 then argerr("wait", "opts.factor must be >= 1", 4) end
  if o.jitter < 0 or o.jitter >= 1 then argerr("wait", "opts.jitter must be in [0, 1)", 4) end
  if opts.deadline ~= nil then
    local d = opts.deadline
    if type(d) ~= "number" or d ~= d or d <= 0 then argerr("wait", "opts.deadline must be a number > 0", 4) end
    o.deadline = d
  end
  check("wait", "opts.on_progress", opts.on_progress, "function", true)
  o.on_progress = opts.on_progress
  if opts.stuck_after ~= nil then
    local v = opts.stuck_after
    if type(v) ~= "number" or v ~= v or v < 0 then argerr("wait", "opts.stuck_after must be a number >= 0", 4) end
    o.stuck_after = v
  end
  check("wait", "opts.on_stuck", opts.on_stuck, "function", true)
  o.on_stuck = opts.on_stuck
  return o
end

--- Poll a batch until it is final, with backoff.
-- The service asks for about a minute between polls: `interval` (60 s,
-- or the environment's LBATCH_POLL_INTERVAL)
-- grows by `factor` (1.5) up to `max_interval` (600 s), with `jitter`
-- (0.1). `on_progress(batch)` runs on every change of status or counts.
-- Every wait on a client shares its watcher (`lbatch.watch`): at most
-- `poll_budget` status calls a minute in all, and `list` pages instead of
-- one `retrieve` each when many batches are due.
-- @tparam string id
-- @tparam[opt] table opts interval, factor, max_interval, jitter,
-- deadline (seconds), on_progress, stuck_after (seconds) and
-- on_stuck(batch, seconds): called once when the batch has stayed in one
-- status that long (validating or finalizing for hours: the wait goes on;
-- cancel it from there if you will)
-- @treturn table the final batch, or nil and an error (`timeout` past
-- the deadline, with `err.batch`)
function Client:wait(id, opts)
  check("wait", "id", id, "string")
  local o = wait_opts(opts)
  transport(self)
  return self:watcher():wait(id, o)
end

-- (made apart: a function that keeps a local captured by a closure ends
-- LuaJIT's trace on its return, and every wait goes through watcher())
local function new_watcher(client)
  return watch.new({ loop = client.scheduler.loop, per_minute = client.config.poll_budget,
                     dialect = client.dialect,
                     retrieve = function(id) return client:retrieve(id) end,
                     list = function(q) return client:list_batches(q) end })
end

--- The client's watcher (`lbatch.watch`): its budget of status calls
-- (`poll_budget` a minute) and the poller every `wait` shares. `calls`
-- counts the status calls it made.
-- @treturn table the watcher
function Client:watcher()
  local w = self.watch
  if not w then
    w = new_watcher(self)
    self.watch = w
  end
  return w
end

--- Hand the client a notice (`lbatch.notify`'s verified one, or a batch
-- id): the waits on that batch fetch it from the service at once. Only a
-- hint: nothing acts on what the notice says.
-- @tparam table|string n the notice (its batch_id) or a batch id
-- @treturn boolean true when a wait on that batch was woken
function Client:notice(n)
  local id = type(n) == "table" and n.batch_id or n
  if type(id) ~= "string" then return false end
  return self:watcher():hint(id)
end

--- Say that notices will come (webhooks or callbacks handed to
-- `notice`): each wait then polls first after its interval, as the
-- fallback for a notice lost, not at once.
-- @tparam[opt=true] boolean on
function Client:expect_notices(on) self:watcher():expect(on ~= false) end

-- ------------------------------------------------------------ the scheduler

-- Shorthands for the client's scheduler (`lbatch.scheduler`): on a shared
-- one they drive every client on it.

--- Start a task (`scheduler:spawn`).
-- @tparam function fn
-- @param ... its arguments
-- @treturn table the task
function Client:spawn(fn, ...) return self.scheduler:spawn(fn, ...) end

--- Sleep in a task (`scheduler:sleep`).
-- @tparam number seconds
function Client:sleep(seconds) return self.scheduler:sleep(seconds) end

--- Let a host's step() end in a task's long work (`scheduler:pause`).
function Client:pause() return self.scheduler:pause() end

--- Run `fn` at the end of every loop turn (`scheduler:at_turn_end`).
-- @tparam function fn
-- @treturn function a remover
function Client:at_turn_end(fn) return self.scheduler:at_turn_end(fn) end

--- Drive the loop until every task is done (`scheduler:run`).
-- @treturn true, or nil and the error of a task that failed
function Client:run() return self.scheduler:run() end

--- Do what is ready, never wait (`scheduler:step`).
-- @tparam[opt=0.5] number budget_ms
-- @treturn integer the work still pending
-- @treturn ?table the error of a task that failed, when one did
function Client:step(budget_ms) return self.scheduler:step(budget_ms) end

--- Milliseconds until step() is next needed (`scheduler:timeout`).
-- @treturn integer
function Client:timeout() return self.scheduler:timeout() end

--- The descriptor a host waits on (`scheduler:pollfd`).
-- @treturn integer
function Client:pollfd() return self.scheduler:pollfd() end

--- cqueues' pollable protocol (`scheduler:pollable`).
-- @treturn table
function Client:pollable() return self.scheduler:pollable() end

--- Close the client: the key is forgotten, and its own scheduler (not a
-- shared one) stops every transfer.
function Client:close()
  if transports[self] then
    transports[self] = nil
    if self.own_scheduler then self.scheduler:close() end
  end
end

return Client
