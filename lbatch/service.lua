--- Facts about the service, written once.
--
-- The client, the request-file rules, the command and the emulator all
-- `require` this module: the regions' base URLs, the batch statuses, the
-- endpoints, the limits and the date formats the service uses. Pure Lua,
-- so it also loads inside nginx.
-- @module lbatch.service
local M = {}

--- Base URLs by region.
-- `cn` (Beijing) and `intl` (Singapore) are DashScope's compatible mode;
-- `openai` is OpenAI's API.
M.REGIONS = {
  cn = "https://dashscope.aliyuncs.com/compatible-mode/v1",
  intl = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
  openai = "https://api.openai.com/v1",
}

--- Every status a batch can have, in lifecycle order.
M.STATUSES = { "validating", "in_progress", "finalizing", "completed", "failed", "expired",
               "cancelling", "cancelled" }

--- The statuses a batch never leaves (a set).
M.FINAL = { completed = true, failed = true, expired = true, cancelled = true }

--- The final statuses in which part of a batch did not run (a set): the
-- requests without a result can be sent again.
M.PARTIAL = { expired = true, cancelled = true }

--- The endpoints a batch input file may use (a set).
M.ENDPOINTS = {
  ["/v1/chat/completions"] = true,
  ["/v1/embeddings"] = true,
  ["/v1/chat/ds-test"] = true,
}

--- The free test model and its rules.
M.TEST = { model = "batch-test-model", url = "/v1/chat/ds-test", max_lines = 100,
           max_bytes = 1024 * 1024, running = 2 }

--- The service's limits.
M.LIMITS = {
  max_lines = 50000,                    -- lines per input file
  max_bytes = 500 * 1024 * 1024,        -- bytes per input file
  max_line_bytes = 6 * 1024 * 1024,     -- bytes per line
  min_window_hours = 24, max_window_hours = 336,
  create_per_minute = 1000, running = 1000,
  retrieve_per_minute = 1000, cancel_per_minute = 1000, list_per_minute = 100,
  max_files = 10000, max_storage_bytes = 100 * 1000 * 1000 * 1000,
}

-- ------------------------------------------------------------ dates

--- Days from 1970-01-01 to a civil date (proleptic Gregorian calendar).
-- @tparam integer y year
-- @tparam integer m month, 1 to 12
-- @tparam integer d day of the month
-- @treturn integer days (negative before 1970)
function M.days_from_civil(y, m, d)
  local floor = math.floor
  y = m <= 2 and y - 1 or y
  local era = floor(y / 400)
  local yoe = y - era * 400
  local doy = floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + floor(yoe / 4) - floor(yoe / 100) + doy - 719468
end

local function epoch(y, mo, d, h, mi, s)
  return M.days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s
end

local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6,
                 Jul = 7, Aug = 8, Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

--- An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) as seconds since the epoch.
-- @tparam string s the date
-- @treturn ?integer seconds, or nil when `s` is not an HTTP date
function M.http_date(s)
  local d, mon, y, hh, mm, ss = s:match("(%d+) (%a%a%a) (%d%d%d%d) (%d%d):(%d%d):(%d%d)")
  local mo = MONTHS[mon or ""]
  if not mo then return nil end
  return epoch(tonumber(y), mo, tonumber(d), tonumber(hh), tonumber(mm), tonumber(ss))
end

--- A list filter's time (`yyyyMMddHHmmss`, UTC) as seconds since the epoch.
-- @tparam string s the time
-- @treturn ?integer seconds, or nil when `s` is not in that form
function M.ts14(s)
  local y, mo, d, h, mi, se = s:match("^(%d%d%d%d)(%d%d)(%d%d)(%d%d)(%d%d)(%d%d)$")
  if not y then return nil end
  return epoch(tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(se))
end

return M
