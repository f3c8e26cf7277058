-- Who may call, and how often: the API key and the service's rate limits.
local respond = require "emu.respond"

local G = {}
local cfg

local LIMITS = { create = 1000, retrieve = 1000, cancel = 1000, list = 100 }
local windows = {}  -- class -> {minute, count}

function G.init(config) cfg = config end

function G.authorized()
  local h = ngx.var.http_authorization
  local key = h and h:match("^Bearer%s+(%S+)%s*$")
  if not key then return false end
  return cfg.api_key == nil or key == cfg.api_key
end

-- a 429 response when `class` is over its limit this minute, else nil
function G.rate_limited(class)
  if not cfg.rate_limits or not LIMITS[class] then return nil end
  local now = ngx.now()
  local minute = math.floor(now / 60)
  local w = windows[class]
  if not w or w.minute ~= minute then w = { minute = minute, count = 0 } windows[class] = w end
  w.count = w.count + 1
  if w.count > LIMITS[class] then
    local wait = math.max(1, math.ceil((minute + 1) * 60 - now))
    return respond.err(429, "rate_limit_exceeded",
      ("Rate limit reached: %d %s requests per minute."):format(LIMITS[class], class), nil,
      { ["Retry-After"] = tostring(wait) })
  end
end

return G
