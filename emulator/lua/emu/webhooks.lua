-- OpenAI-dialect webhooks: when a batch ends, POST an event to the URL
-- given at start (emulator/run --webhook-url URL --webhook-secret whsec_...)
-- signed by the Standard Webhooks scheme (lbatch.notify.sign: the same
-- HMAC-SHA256 over "id.timestamp.body" the service uses), and retried with
-- backoff while the receiver fails (no answer, or not 2xx): each attempt
-- with the same webhook-id and a fresh timestamp and signature, as the
-- service does. The backoff is in service seconds (--speed divides it):
-- 5 s, doubling to an hour, for up to 72 service hours.
local cjson = require "cjson.safe"
local notify = require "lbatch.notify"

local W = { sent = 0, failed = 0, attempts = 0, delivered = {} }

local TYPES = { completed = "batch.completed", failed = "batch.failed",
                expired = "batch.expired", cancelled = "batch.cancelled" }
local FIRST, MAX, GIVE_UP = 5, 3600, 72 * 3600     -- service seconds

local cfg

function W.init(config)
  cfg = config
  if cfg.webhook_url and not cfg.webhook_url:match("^https?://[^/]+") then
    error("emu.webhooks: --webhook-url must be http(s)://HOST[:PORT]/PATH")
  end
  if cfg.webhook_url and not notify.key(cfg.webhook_secret) then
    error("emu.webhooks: --webhook-secret must be whsec_<base64>")
  end
end

local function hex(n)
  local t = {}
  for i = 1, n do t[i] = ("%02x"):format(math.random(0, 255)) end
  return table.concat(t)
end

-- one POST; true when the receiver answered 2xx (the DashScope callback
-- goes out this way too: engine.lua)
local function post(url, headers, body)
  local scheme, host, port, path = url:match("^(https?)://([^/:]+):?(%d*)(/?.*)$")
  if not scheme then return false end
  port = tonumber(port) or (scheme == "https" and 443 or 80)
  local sock = ngx.socket.tcp()
  sock:settimeout(5000)
  local ok = sock:connect(host == "localhost" and "127.0.0.1" or host, port)
  if not ok then return false end
  if scheme == "https" and not sock:sslhandshake(nil, host, false) then sock:close() return false end
  local req = { "POST ", path ~= "" and path or "/", " HTTP/1.1\r\nHost: ", host,
                "\r\nContent-Type: application/json\r\nUser-Agent: OpenAI/webhooks (lbatch emulator)",
                "\r\nContent-Length: ", #body, "\r\nConnection: close\r\n" }
  for k, v in pairs(headers or {}) do req[#req + 1] = k .. ": " .. v .. "\r\n" end
  req[#req + 1] = "\r\n"
  req[#req + 1] = body
  if not sock:send(table.concat(req)) then sock:close() return false end
  local line = sock:receive("*l")
  sock:close()
  local status = line and tonumber(line:match("^HTTP/%d[%.%d]* (%d%d%d)"))
  return status ~= nil and status >= 200 and status < 300
end

W.post = post

local function attempt(premature, url, secret, id, body, n, waited)
  if premature then return end
  W.attempts = W.attempts + 1
  local ts = ngx.time()
  local ok = post(url, { ["webhook-id"] = id, ["webhook-timestamp"] = tostring(ts),
                         ["webhook-signature"] = notify.sign(secret, id, ts, body) }, body)
  if ok then
    W.sent = W.sent + 1
    W.delivered[#W.delivered + 1] = id
    return
  end
  local delay = math.min(FIRST * 2 ^ (n - 1), MAX)
  if waited + delay > GIVE_UP then W.failed = W.failed + 1 return end
  ngx.timer.at(math.max(delay / cfg.speed, 0.01), attempt, url, secret, id, body, n + 1, waited + delay)
end

-- a batch ended: its event, when webhooks are on
function W.batch_ended(b)
  if not cfg or not cfg.webhook_url then return end
  local t = TYPES[b.status]
  if not t then return end
  local body = cjson.encode({ object = "event", id = "evt_" .. hex(12), type = t,
                              created_at = ngx.time(), data = { id = b.id } })
  ngx.timer.at(0, attempt, cfg.webhook_url, cfg.webhook_secret, "wh_" .. hex(16), body, 1, 0)
end

return W
