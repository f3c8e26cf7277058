-- Who may call, and how often: the API key, and the service's rate limits
-- per key (an account), from the limits profile (--limits).
local respond = require "emu.respond"

local G = {}
local cfg

local windows = {}  -- owner .. class -> {minute, count}

function G.init(config) cfg = config end

-- the caller's key (Bearer; Azure's api-key header: emu.providers)
local function bearer() return require("emu.providers").key() end

function G.authorized()
  local key = bearer()
  if not key then return false end
  return cfg.api_key == nil or key == cfg.api_key
end

-- the caller's account, as the journal may keep it: a hash, not the key
function G.owner()
  return ("%08x"):format(ngx.crc32_long(bearer() or ""))
end

-- a 429 response when this key's `class` is over its limit this minute, else nil
function G.rate_limited(class)
  local limit = class and cfg.profile[class .. "_per_minute"]
  if not cfg.rate_limits or not limit then return nil end
  local now = ngx.now()
  local minute = math.floor(now / 60)
  local id = G.owner() .. class
  local w = windows[id]
  if not w or w.minute ~= minute then w = { minute = minute, count = 0 } windows[id] = w end
  w.count = w.count + 1
  if w.count > limit then
    local wait = math.max(1, math.ceil((minute + 1) * 60 - now))
    return respond.err(429, "rate_limit_exceeded",
      ("Rate limit reached: %d %s requests per minute."):format(limit, class), nil,
      { ["Retry-After"] = tostring(wait) })
  end
end

return G
