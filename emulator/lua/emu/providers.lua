-- The providers' differences from OpenAI (emulator/run --dialect azure|groq|
-- together|siliconflow|zhipu|moonshot|cerebras|novita|litellm): the rest of
-- the emulator speaks OpenAI's dialect, and this room turns the request's path
-- and key into OpenAI's and OpenAI's answer into the provider's, from the facts
-- in lbatch.service.PROVIDERS (each with its source there).
local cjson = require "cjson"
local service = require "lbatch.impl.api.service"

local P = { name = nil }
local provider

function P.init(name)
  P.name = name
  provider = name and service.PROVIDERS[name] or nil
end

-- the purpose of a batch's input file (Together's batch-api)
function P.purpose() return provider and provider.purpose or "batch" end

-- the window of a create that gives none (nil: it is required)
function P.default_window() return provider and provider.window_default end

-- does the provider upload in Together's three steps?
function P.presigned() return provider ~= nil and provider.upload == "presigned" end

local function escape(s) return (s:gsub("[%^%$%(%)%%%.%[%]%*%+%-%?]", "%%%1")) end

-- the request's path as OpenAI's (/v1/...): the provider's prefix (Azure's
-- legacy /openai too) replaced
function P.path(path)
  if not provider then return path end
  local out, n = path:gsub("^" .. escape(provider.prefix), "/v1", 1)
  if n == 0 and provider.legacy_prefix then out = path:gsub("^" .. escape(provider.legacy_prefix) .. "/", "/v1/", 1) end
  return out
end

-- the caller's key: Azure's api-key header (or Bearer, an Entra token);
-- everyone else's Bearer
function P.key()
  if provider and provider.auth == "api-key" and ngx.var.http_api_key then return ngx.var.http_api_key end
  local h = ngx.var.http_authorization
  return h and h:match("^Bearer%s+(%S+)%s*$")
end

local TIMES = { "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
                "expired_at", "cancelling_at", "cancelled_at" }
local CAPS = { validating = "VALIDATING", in_progress = "IN_PROGRESS", finalizing = "IN_PROGRESS",
               completed = "COMPLETED", failed = "FAILED", expired = "EXPIRED", cancelling = "CANCELLED",
               cancelled = "CANCELLED" }
local NOVITA = { validating = "VALIDATING", in_progress = "PROGRESS", finalizing = "PROGRESS",
                 completed = "COMPLETED", failed = "FAILED", expired = "EXPIRED", cancelling = "CANCELLING",
                 cancelled = "CANCELLED" }

local function iso(t)
  if type(t) ~= "number" then return t end
  return os.date("!%Y-%m-%dT%H:%M:%S.000Z", t)
end

-- one batch in the provider's shape
local function batch(b)
  local name = P.name
  if name == "together" then
    local c = type(b.request_counts) == "table" and b.request_counts or {}
    local total = tonumber(c.total) or 0
    local input = require("emu.store").files[b.input_file_id]
    local out = { id = b.id, user_id = "user-emulator", input_file_id = b.input_file_id, endpoint = b.endpoint,
      model_id = b.model or cjson.null, status = CAPS[b.status] or b.status, created_at = iso(b.created_at),
      completed_at = iso(b.completed_at or b.failed_at or b.cancelled_at or b.expired_at) or cjson.null,
      job_deadline = iso(b.expires_at) or cjson.null, output_file_id = b.output_file_id or cjson.null,
      error_file_id = b.error_file_id or cjson.null, file_size_bytes = input and input.bytes or 0,
      progress = total > 0 and math.floor(100 * ((c.completed or 0) + (c.failed or 0)) / total) or 0 }
    return out
  elseif name == "novita" then
    b.status = NOVITA[b.status] or b.status
    for _, k in ipairs(TIMES) do if b[k] ~= nil and b[k] ~= cjson.null then b[k] = iso(b[k]) end end
  elseif name == "siliconflow" then
    if b.status == "validating" or (b.status == "in_progress" and (b.request_counts or {}).completed == 0) then
      b.status = "in_queue"
    end
    b.request_counts = cjson.null
  elseif name == "azure" then
    for _, k in ipairs({ "output_file_id", "error_file_id" }) do
      if b[k] == nil or b[k] == cjson.null then b[k] = "" end
    end
  elseif name == "zhipu" then
    if b.endpoint == "/v1/chat/completions" then b.endpoint = "/v4/chat/completions" end
  end
  return b
end

-- Together's file (together-ai 0.52.0 src/resources/files.ts FileResponse:
-- FileType, Processed beside OpenAI's fields; FileList is {data})
local function together_file(f)
  f.FileType, f.file_type = f.file_type or "jsonl", nil
  f.Processed = f.status == "processed"
  return f
end

local function files(route, v, res)
  if route == "GET /files" then
    local data = type(v.data) == "table" and v.data or {}
    for i, f in ipairs(data) do data[i] = together_file(f) end
    res.body = #data > 0 and cjson.encode({ data = data }) or '{"data":[]}'
  elseif v.object == "file" and v.deleted == nil then
    res.body = cjson.encode(together_file(v))
  end
  return res
end

-- an answer in the provider's shape: route is the route's name ("POST
-- /batches", ...), res the answer OpenAI's dialect made
function P.answer(route, res)
  if not provider or res.file or type(res.body) ~= "string" then return res end
  local ok, v = pcall(cjson.decode, res.body)
  if not ok or type(v) ~= "table" then return res end
  if res.status >= 400 then
    if P.name == "siliconflow" and type(v.error) == "table" then
      -- its own envelope (docs.siliconflow.cn): {code, message, data}
      res.body = cjson.encode({ code = 20000 + res.status, message = v.error.message, data = cjson.null })
    end
    return res
  end
  if P.name == "together" and (route or ""):find("/files", 1, true) then return files(route, v, res) end
  if not (route or ""):find("/batches", 1, true) then return res end
  if route == "GET /batches" then
    local data = type(v.data) == "table" and v.data or {}
    for i, b in ipairs(data) do data[i] = batch(b) end
    if P.name == "together" then            -- a bare array (together-ai: BatchListResponse = Array<BatchJob>)
      res.body = #data > 0 and cjson.encode(data) or "[]"
      return res
    end
    v.data = data
    if #data == 0 then
      res.body = res.body:gsub('"data":%b[]', '"data":[]')
      return res
    end
    res.body = cjson.encode(v)
    return res
  end
  v = batch(v)
  if P.name == "together" and route == "POST /batches" then
    v = { job = v, warning = "" }       -- together-ai: BatchCreateResponse {job, warning}
  end
  res.body = cjson.encode(v)
  return res
end

return P
