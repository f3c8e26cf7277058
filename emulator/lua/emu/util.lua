-- Small helpers: ids, the public view of a batch, the dialect.
local cjson = require "cjson"
local service = require "lbatch.impl.api.service"

local U = { dialect = "dashscope" }

math.randomseed(math.floor(ngx.now() * 1000) + ngx.worker.pid())

local HEX = "0123456789abcdef"
function U.hex(n)
  local t = {}
  for i = 1, n do
    local k = math.random(16)
    t[i] = HEX:sub(k, k)
  end
  return table.concat(t)
end

function U.uuid()
  local v = math.random(4)
  return table.concat({ U.hex(8), U.hex(4), "4" .. U.hex(3), ("89ab"):sub(v, v) .. U.hex(3), U.hex(12) }, "-")
end

-- A list filter's create_after / create_before (yyyyMMddHHmmss, or
-- yyyyMMdd as the recorded file list sends) as seconds since the epoch, or
-- nil. The service reads them in Beijing time (UTC+8): its recorded list
-- with create_after=20260417162000 holds a batch created at 08:26:34 UTC.
function U.list_time(v)
  local s = tostring(v)
  if s:match("^%d%d%d%d%d%d%d%d$") then s = s .. "000000" end
  local t = service.ts14(s)
  return t and t - 8 * 3600
end

-- A list's create_after and create_before, as list_time reads them:
-- {create_after = t, create_before = t}, or nil and the one that is wrong.
function U.list_window(args)
  local w = {}
  for _, k in ipairs({ "create_after", "create_before" }) do
    if args[k] then
      w[k] = U.list_time(args[k])
      if not w[k] then return nil, k end
    end
  end
  return w
end

-- The fields of a batch, in each dialect. The service's (recorded in
-- spec/fixtures/recorded) has no model and no usage, and expires_at is
-- null at every stage; OpenAI's has both, and an expires_at.
local BATCH_FIELDS = {
  dashscope = { "id", "object", "endpoint", "errors", "input_file_id", "completion_window",
    "status", "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata" },
  openai = { "id", "object", "endpoint", "model", "errors", "input_file_id", "completion_window",
    "status", "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "usage", "metadata" },
}

-- What clients see of a batch: no internal state, the running counts, and
-- absent fields as null (dashscope) or left out (openai: the spec types
-- them as plain strings and integers).
function U.public(b, engine)
  local out = {}
  local dashscope = U.dialect == "dashscope"
  local fill = dashscope and cjson.null or nil
  for _, k in ipairs(BATCH_FIELDS[U.dialect] or BATCH_FIELDS.openai) do
    local v = b[k]
    if v == nil then v = fill end
    out[k] = v
  end
  if dashscope then
    out.expires_at = cjson.null
    if out.metadata == cjson.null then out.metadata = {} end       -- the documents show {}
  end
  if engine then
    out.status = engine.visible_status(b)
    out.request_counts = engine.counts(b) or { total = 0, completed = 0, failed = 0 }
  end
  if out.request_counts == nil then out.request_counts = { total = 0, completed = 0, failed = 0 } end
  return out
end

return U
