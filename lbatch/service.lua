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

--- The statuses a batch never leaves (a set).
M.FINAL = { completed = true, failed = true, expired = true, cancelled = true }

--- Codes that put the fault on the account, not on a request (a set):
-- arrears, an exhausted quota or billing limit, a refused or revoked key.
-- Every batch would fail the same way, so a pipeline stops at the first.
M.ACCOUNT = { Arrearage = true, ["AccessDenied.Unpurchased"] = true, InvalidApiKey = true,
              insufficient_quota = true, billing_hard_limit_reached = true, invalid_api_key = true,
              account_deactivated = true }

--- The final statuses in which part of a batch did not run (a set): the
-- requests without a result can be sent again.
M.PARTIAL = { expired = true, cancelled = true }

--- The dialect each region speaks: `dashscope` or `openai`.
M.DIALECT = { cn = "dashscope", intl = "dashscope", openai = "openai" }

--- Every batch endpoint, with the field a line's body must hold (besides
-- `model`, which moderations may leave out) and the dialects that take it.
M.ENDPOINT_RULES = {
  ["/v1/chat/completions"] = { field = "messages", dashscope = true, openai = true },
  ["/v1/embeddings"] = { field = "input", dashscope = true, openai = true },
  ["/v1/chat/ds-test"] = { field = "messages", dashscope = true },
  ["/v1/responses"] = { openai = true },
  ["/v1/completions"] = { field = "prompt", openai = true },
  ["/v1/moderations"] = { field = "input", model_optional = true, openai = true },
}

--- The endpoints of any dialect (a set). A profile's `endpoints` are its own.
M.ENDPOINTS = {}
for url in pairs(M.ENDPOINT_RULES) do M.ENDPOINTS[url] = true end

--- The free test model and its rules.
M.TEST = { model = "batch-test-model", url = "/v1/chat/ds-test", max_lines = 100,
           max_bytes = 1024 * 1024, running = 2 }

local MB = 1024 * 1024

local function endpoints_of(dialect)
  local t = {}
  for url, rule in pairs(M.ENDPOINT_RULES) do if rule[dialect] then t[url] = true end end
  return t
end

--- Limits profiles, by name.
-- `dashscope`: the current DashScope documents (1,000 creates a minute and
-- 1,000 running, 6 MB lines). `dashscope-strict`: the older document's
-- stricter numbers (1 MB lines; create 100 a minute with 100 running,
-- retrieve 300, cancel 100). `openai`: OpenAI's (200 MB files, 50,000
-- embedding inputs a batch, a 24h window only).
M.PROFILES = {
  dashscope = {
    name = "dashscope", dialect = "dashscope", endpoints = endpoints_of("dashscope"),
    max_lines = 50000, max_bytes = 500 * MB, max_line_bytes = 6 * MB,
    min_window_hours = 24, max_window_hours = 336,
    create_per_minute = 1000, running = 1000, retrieve_per_minute = 1000, cancel_per_minute = 1000,
    list_per_minute = 100, max_files = 10000, max_storage_bytes = 100 * 1000 * 1000 * 1000,
  },
  ["dashscope-strict"] = {
    name = "dashscope-strict", dialect = "dashscope", endpoints = endpoints_of("dashscope"),
    max_lines = 50000, max_bytes = 500 * MB, max_line_bytes = 1 * MB,
    min_window_hours = 24, max_window_hours = 336,
    create_per_minute = 100, running = 100, retrieve_per_minute = 300, cancel_per_minute = 100,
    list_per_minute = 100, max_files = 10000, max_storage_bytes = 100 * 1000 * 1000 * 1000,
  },
  openai = {
    name = "openai", dialect = "openai", endpoints = endpoints_of("openai"),
    max_lines = 50000, max_bytes = 200 * MB, max_line_bytes = 200 * MB, max_embedding_inputs = 50000,
    min_window_hours = 24, max_window_hours = 24,
    create_per_minute = 1000, running = 1000, retrieve_per_minute = 1000, cancel_per_minute = 1000,
    list_per_minute = 1000,
  },
}

--- The current DashScope limits (the `dashscope` profile).
M.LIMITS = M.PROFILES.dashscope

--- A profile by name, or the default of a region (`cn`, `intl`: dashscope;
-- `openai`: openai).
-- @tparam ?string name a profile or a region (default `dashscope`)
-- @treturn ?table the profile, nil when unknown
function M.profile(name)
  if name == nil then return M.PROFILES.dashscope end
  if M.PROFILES[name] then return M.PROFILES[name] end
  local dialect = M.DIALECT[name]
  return dialect and M.PROFILES[dialect] or nil
end

--- The models the DashScope regions list for batch, by endpoint (Model
-- Studio's batch documents, 2026). Lists change: a model outside them is a
-- warning, not an error.
M.MODELS = {
  cn = {
    ["/v1/chat/completions"] = {
      "qwen3.8-max", "qwen3.7-max", "qwen3-max", "qwen-max", "qwen-max-latest",
      "qwen3.7-plus", "qwen3.6-plus", "qwen3.5-plus", "qwen-plus", "qwen-plus-latest",
      "qwen3.8-flash", "qwen3.7-flash", "qwen3.6-flash", "qwen3.5-flash", "qwen-flash",
      "qwen-turbo", "qwen-turbo-latest", "qwen-long", "qwen-long-latest", "qwq-plus",
      "deepseek-r1", "deepseek-v3.2", "deepseek-v3",
      "qwen3-vl-plus", "qwen3-vl-flash", "qwen-vl-max", "qwen-vl-plus", "qwen-vl-ocr", "qwen-vl-ocr-latest",
      "qwen3.5-omni-plus",
    },
    ["/v1/embeddings"] = { "text-embedding-v1", "text-embedding-v2", "text-embedding-v3", "text-embedding-v4",
                           "qwen3.7-text-embedding", "qwen3.7-text-embedding-flash" },
    ["/v1/chat/ds-test"] = { "batch-test-model" },
  },
  intl = {
    ["/v1/chat/completions"] = { "qwen3.7-plus", "qwen-max", "qwen-plus", "qwen-flash", "qwen-turbo" },
    ["/v1/embeddings"] = {},
    ["/v1/chat/ds-test"] = { "batch-test-model" },
  },
}

--- Does a region list `model` for `endpoint`?
-- @tparam string region `cn` or `intl` (other regions: always true)
-- @tparam string endpoint
-- @tparam string model
-- @treturn boolean
-- @treturn ?{string,...} the region's list for the endpoint
function M.serves(region, endpoint, model)
  local lists = M.MODELS[region]
  if not lists then return true end
  local list = lists[endpoint] or {}
  for _, m in ipairs(list) do if m == model then return true, list end end
  return false, list
end

--- Is `model` an embedding model?
function M.is_embedding_model(model)
  return model:find("embedding", 1, true) ~= nil
end

-- models that think unless told not to (DashScope: the qwen3.5 to 3.8
-- series, the open-source qwen3 models, QwQ and DeepSeek-R1); the
-- commercial qwen-plus, qwen-flash and qwen-turbo do not
local THINKING = { "^qwen3%.[5-9]", "^qwen3%-%d+b", "^qwq", "^deepseek%-r1", "%-thinking" }
local defaults, ndefaults = {}, 0   -- model -> its default, for the last few hundred models (a cache)

--- The thinking mode a request runs in: its `enable_thinking` when it is
-- a boolean, else the model's default.
-- @tparam table body the request body
-- @treturn boolean
function M.thinking(body)
  local t = body.enable_thinking
  if t == true or t == false then return t end
  local model = type(body.model) == "string" and body.model or ""
  local d = defaults[model]
  if d ~= nil then return d end
  d = false
  if not model:find("%-instruct") then
    for _, p in ipairs(THINKING) do if model:find(p) then d = true break end end
  end
  if ndefaults >= 256 then defaults, ndefaults = {}, 0 end
  defaults[model], ndefaults = d, ndefaults + 1
  return d
end

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
