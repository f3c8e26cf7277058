-- DashScope Batch Chat, as the service answers it (help.aliyun.com/zh/model-studio/
-- openai-compatible-batch-chat): one chat request a call, held in a queue
-- until answered, the wait 3,600 s unless the call asks for 60 to 3,600 s,
-- a timeout error when the wait passes. The service's host is its own
-- (https://batch.dashscope.aliyuncs.com/compatible-mode/v1); here it sits
-- behind the prefix /_batchchat on the emulator's host, so that a client
-- names it as its batch_chat_url:
--
--   POST /_batchchat/compatible-mode/v1/chat/completions   the held call
--   GET  /_batchchat/_stats     requests, answers, 429s, timeouts, the most
--                               held at once, the waits asked (seconds ->
--                               calls), and per key (a request's last
--                               message's content: the specs put its
--                               custom_id there) its requests and answers
--   POST /_batchchat/_config    {queue = N (calls held at once, default
--                               10000; past it, 429), service = S (service
--                               seconds a call takes, default 2, spread
--                               0.5x to 1.5x; scaled by --speed),
--                               timeout_once = {key, ...} (these keys' next
--                               call outlives its wait), throttle_once =
--                               {key, ...} (their next call gets a 429),
--                               reset = true (the counts to zero)}
--
-- The document names no status for the timeout nor for a full queue: 504
-- `RequestTimeOut` and 429 `Throttling` are the emulator's, in the
-- DashScope dialect's error shape. The wait comes in the request header
-- X-DashScope-Timeout (see lbatch/impl/api/service.lua's batch_chat_wait)
-- and is answered in the same header, as the service answers its calls.
local cjson = require "cjson"
local respond = require "emu.respond"
local engine = require "emu.engine"
local guard = require "emu.guard"

local B = {}
local cfg
local conf = { queue = 10000, service = 2 }
local held, stats, once

local function reset()
  held = 0
  stats = { requests = 0, answered = 0, throttled = 0, timeouts = 0, held_peak = 0, keys = {}, waits = {} }
  once = { timeout = {}, throttle = {} }
end
reset()

function B.init(config) cfg = config end

-- a request's key: its last message's content (a string)
local function key_of(body)
  local m = type(body.messages) == "table" and body.messages[#body.messages]
  return type(m) == "table" and type(m.content) == "string" and m.content or "?"
end

local function take(set, key)
  local n = set[key]
  if not n or n <= 0 then return false end
  set[key] = n - 1
  return true
end

local function configure()
  local body, e = respond.read_json()
  if not body then return e end
  if body.reset then reset() end
  conf.queue = tonumber(body.queue) or conf.queue
  conf.service = tonumber(body.service) or conf.service
  for name, set in pairs({ timeout_once = once.timeout, throttle_once = once.throttle }) do
    for _, k in ipairs(type(body[name]) == "table" and body[name] or {}) do set[k] = (set[k] or 0) + 1 end
  end
  return respond.json(200, { queue = conf.queue, service = conf.service })
end

-- the control paths: no key, and not counted as the API's requests
function B.admin(method, path)
  if path == "/_stats" and method == "GET" then
    local s = {}
    for k, v in pairs(stats) do s[k] = v end
    s.held = held
    if next(s.keys) == nil then s.keys, s.waits = cjson.null, cjson.null end
    return respond.json(200, s)
  elseif path == "/_config" and method == "POST" then
    return configure()
  end
  return respond.err(404, "unknown_url", ("Invalid URL (%s /_batchchat%s)"):format(method, path))
end

-- the wait the call asks for (seconds), or nil and the service's error
local function wait_of()
  local h = ngx.var.http_x_dashscope_timeout
  if h == nil then return 3600 end
  local w = tonumber(h)
  if not w or w < 60 or w > 3600 then
    return nil, respond.err(400, "InvalidParameter", "X-DashScope-Timeout must be from 60 to 3600 seconds.")
  end
  return math.floor(w)
end

-- one held call
local function held_call(body, raw)
  local key = key_of(body)
  local k = stats.keys[key] or { requests = 0, answered = 0 }
  stats.keys[key] = k
  stats.requests, k.requests = stats.requests + 1, k.requests + 1
  if held >= conf.queue or take(once.throttle, key) then
    stats.throttled = stats.throttled + 1
    return respond.err(429, "Throttling", "Requests throttled: the Batch Chat queue is full, please retry later.")
  end
  local wait, werr = wait_of()
  if not wait then return werr end
  stats.waits[tostring(wait)] = (stats.waits[tostring(wait)] or 0) + 1
  held = held + 1
  if held > stats.held_peak then stats.held_peak = held end
  local service = take(once.timeout, key) and wait + 1 or conf.service * (0.5 + math.random())
  ngx.sleep(math.min(service, wait) / cfg.speed)
  held = held - 1
  if service > wait then
    stats.timeouts = stats.timeouts + 1
    return respond.err(504, "RequestTimeOut", ("The request waited %d s in the queue without an answer."):format(wait))
  end
  local status, answer = engine.answer("/v1/chat/completions", body, raw)
  if status == 200 then stats.answered, k.answered = stats.answered + 1, k.answered + 1 end
  return respond.json(status, answer, { ["x-dashscope-timeout"] = tostring(wait) })
end

-- the API: POST {prefix}/v1/chat/completions, with the key
function B.handle(method, path)
  if not guard.authorized() then
    return respond.err(401, "InvalidApiKey", "Invalid API-key provided.")
  end
  if method ~= "POST" or not path:find("^/compatible%-mode/v1/chat/completions$") then
    return respond.err(404, "unknown_url", ("Invalid URL (%s /_batchchat%s)"):format(method, path))
  end
  local body, e = respond.read_json()
  if not body then return e end
  return held_call(body, cjson.encode(body))
end

return B
