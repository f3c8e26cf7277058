-- A batch flow served by OpenResty: upload, create, wait, download, all
-- through lbatch while the nginx worker keeps serving other requests.
-- Used by locations.conf (and spec/unit/hosts/openresty_spec.lua).
local cjson = require "cjson"
local semaphore = require "ngx.semaphore"
local jsonl = require "lbatch.jsonl"

local M = {}

-- the whole flow; from a request handler or an ngx.timer
function M.run_flow(base_url, n)
  local client = require("lbatch.openresty").client({ api_key = os.getenv("DASHSCOPE_API_KEY") or "k",
                                                       base_url = base_url })
  local path = os.tmpname()
  local w = jsonl.writer({ path = path, model = "qwen-plus" })
  for i = 1, n do assert(w:chat("r" .. i, { prompt = "question " .. i })) end
  w:close()
  local file = assert(client:upload(path))
  os.remove(path)
  local batch = assert(client:create({ input_file_id = file.id, endpoint = "/v1/chat/completions" }))
  batch = assert(client:wait(batch.id, { interval = 0.05, max_interval = 0.5 }))
  local text = assert(client:content(batch.output_file_id))
  local lines = 0
  for _ in text:gmatch("[^\n]+") do lines = lines + 1 end
  return { batch = batch.id, status = batch.status, lines = lines }
end

local function origin() return ngx.var.scheme .. "://127.0.0.1:" .. ngx.var.server_port end
local function base() return origin() .. "/v1" end

-- this worker's client for a dialect (the emulator's openai dialect is
-- the OpenAI region's protocol)
local function client_for(base_url, dialect)
  return assert(require("lbatch.openresty").client({ api_key = os.getenv("DASHSCOPE_API_KEY") or "k",
    base_url = base_url, region = dialect == "openai" and "openai" or nil }))
end

-- Told, not polling: n jobs waited on with a 30 s interval, each woken by
-- its notice (OpenAI's webhook, or DashScope's callback to /app/notify,
-- which each batch names), in this worker
function M.run_told(base_url, n, dialect, callback)
  local client = client_for(base_url, dialect)
  client:expect_notices()
  local path = os.tmpname()
  local w = jsonl.writer({ path = path, model = "qwen-plus" })
  for i = 1, 2 do assert(w:chat("r" .. i, { prompt = "question " .. i })) end
  w:close()
  local file = assert(client:upload(path))
  os.remove(path)
  local watch = client:watcher()
  local calls, t0 = watch.calls, ngx.now()
  local ids, statuses = {}, {}
  for i = 1, n do
    ids[i] = assert(client:create({ input_file_id = file.id, endpoint = "/v1/chat/completions",
      metadata = dialect ~= "openai" and { ds_batch_finish_callback = callback } or nil })).id
  end
  -- one after the other: a notice that comes before its wait is kept, and
  -- that wait asks at once
  for i, id in ipairs(ids) do statuses[i] = assert(client:wait(id, { interval = 30, deadline = 25 })).status end
  return { statuses = statuses, seconds = ngx.now() - t0, calls = watch.calls - calls }
end

local function reply(ok, res)
  ngx.header["Content-Type"] = "application/json"
  if not ok then ngx.status = 500 res = { error = tostring(res) } end
  ngx.say(cjson.encode(res))
end

-- content_by_lua: the flow in the request
function M.flow()
  reply(pcall(M.run_flow, base(), tonumber(ngx.var.arg_n) or 3))
end

-- the flow in an ngx.timer; the request waits for it on a semaphore
function M.flow_in_timer()
  local sema, ok, res = semaphore.new(), false, "timed out"
  local b, n = base(), tonumber(ngx.var.arg_n) or 3
  assert(ngx.timer.at(0, function()
    ok, res = pcall(M.run_flow, b, n)
    sema:post(1)
  end))
  sema:wait(120)
  reply(ok, res)
end

-- /app/told?n=N&dialect=openai|dashscope: run_told from the request
function M.told()
  local dialect = ngx.var.arg_dialect or "dashscope"
  reply(pcall(M.run_told, base(), tonumber(ngx.var.arg_n) or 3, dialect, origin() .. "/app/notify"))
end

-- /app/notify: webhooks and callbacks for this worker's clients, checked
-- with $OPENAI_WEBHOOK_SECRET (nginx.conf: env OPENAI_WEBHOOK_SECRET;)
local handlers = {}
function M.notify()
  local dialect = ngx.var.arg_dialect or "dashscope"
  local handler = handlers[dialect]
  if not handler then
    local secret = os.getenv("OPENAI_WEBHOOK_SECRET")
    handler = require("lbatch.openresty").notify_handler({ secrets = { secret ~= "" and secret or nil },
      client = function() return client_for(base(), dialect) end })
    handlers[dialect] = handler
  end
  return handler()
end

return M
