-- A batch flow served by OpenResty: upload, create, wait, download, all
-- through lbatch while the nginx worker keeps serving other requests.
-- Used by locations.conf (and spec/unit/openresty_spec.lua).
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

local function base() return ngx.var.scheme .. "://127.0.0.1:" .. ngx.var.server_port .. "/v1" end

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

return M
