-- Who may call, and how often: the API key, and the service's rate limits
-- per key (an account), from the limits profile (--limits).
local respond = require "emu.respond"

local G = {}
local cfg

-- owner .. class -> the times of the calls let through in the last minute,
-- oldest first: {first, last, [i] = t}. A rolling minute, not the clock's:
-- a calendar minute would let a burst that straddles its turn through twice
-- over (and made specs that expect the 429 of call 101 pass it by chance).
local windows = {}

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

-- a 429 response when this key's `class` is over its limit for the last
-- minute, else nil (the call is counted); Retry-After: when the oldest call
-- of that minute leaves it
function G.rate_limited(class)
  local limit = class and cfg.profile[class .. "_per_minute"]
  if not cfg.rate_limits or not limit then return nil end
  local now = ngx.now()
  local id = G.owner() .. class
  local w = windows[id]
  if not w then w = { first = 1, last = 0 } windows[id] = w end
  while w.first <= w.last and w[w.first] <= now - 60 do
    w[w.first] = nil
    w.first = w.first + 1
  end
  if w.last - w.first + 1 >= limit then
    local wait = math.max(1, math.ceil(w[w.first] + 60 - now))
    return respond.err(429, "rate_limit_exceeded",
      ("Rate limit reached: %d %s requests per minute."):format(limit, class), nil,
      { ["Retry-After"] = tostring(wait) })
  end
  w.last = w.last + 1
  w[w.last] = now
end

return G
