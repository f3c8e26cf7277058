--- Facts about the service, written once.
--
-- The client, the request-file rules, the command and the emulator all
-- `require` this module: the regions' base URLs, the batch statuses, the
-- endpoints, the limits and the date formats the service uses. Pure Lua,
-- so it also loads inside nginx.
-- @module lbatch.impl.api.service
local M = {}

--- Base URLs by region.
-- `cn` (Beijing) and `intl` (Singapore) are DashScope's compatible mode;
-- `openai` is OpenAI's API.
M.REGIONS = {
  cn = "https://dashscope.aliyuncs.com/compatible-mode/v1",
  intl = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
  openai = "https://api.openai.com/v1",
}

--- Every status of a batch, the ones still running first (a list, in the order `top` shows them).
M.STATUSES = { "validating", "in_progress", "finalizing", "cancelling", "completed", "failed", "expired",
               "cancelled" }

--- The statuses a batch never leaves (a set).
M.FINAL = { completed = true, failed = true, expired = true, cancelled = true }

--- The final statuses that are not a success (a set): the command exits 3 on them.
M.FINAL_BAD = { failed = true, expired = true, cancelled = true }

--- The statuses of a batch still running (a set): every status but the final ones.
M.ACTIVE = { validating = true, in_progress = true, finalizing = true, cancelling = true }

--- Codes that put the fault on the account, not on a request (a set):
-- arrears, an exhausted quota or billing limit, a refused or revoked key.
-- Every batch would fail the same way, so a pipeline stops at the first.
M.ACCOUNT = { Arrearage = true, ["AccessDenied.Unpurchased"] = true, InvalidApiKey = true,
              insufficient_quota = true, billing_hard_limit_reached = true, invalid_api_key = true,
              account_deactivated = true }

--- The final statuses in which part of a batch did not run (a set): the
-- requests without a result can be sent again.
M.PARTIAL = { expired = true, cancelled = true }

--- A batch's metadata: at most `max_keys` pairs, keys of at most `max_key`
-- characters, values of at most `max_value` (OpenAI's API reference, Metadata).
M.METADATA = { max_keys = 16, max_key = 64, max_value = 512 }

--- DashScope's workspace domain of each region: the base URL of a
-- workspace (`%s`: its ID). Singapore's: help.aliyun.com/en/model-studio/
-- batch-interfaces-compatible-with-openai ("a workspace-specific domain for
-- the Singapore region: https://{WorkspaceId}.ap-southeast-1.maas.aliyuncs.com",
-- recommended over dashscope-intl.aliyuncs.com, which keeps working); Beijing's:
-- alibabacloud.com/help/ja/model-studio/batch-interfaces-compatible-with-openai
-- (2026-06-26: https://{WorkspaceId}.cn-beijing.maas.aliyuncs.com).
M.WORKSPACE_DOMAINS = { intl = "https://%s.ap-southeast-1.maas.aliyuncs.com/compatible-mode/v1",
                        cn = "https://%s.cn-beijing.maas.aliyuncs.com/compatible-mode/v1" }

--- The base URL of a DashScope workspace in `region`: nil and why when the
-- region has no workspace domain or `id` is not a workspace ID (one DNS
-- label: letters, digits and inner hyphens, at most 63, so that the key
-- can go nowhere but that host).
-- @tparam string region
-- @tparam string id
-- @treturn ?string the base URL
-- @treturn ?string why not
function M.workspace_url(region, id)
  local domain = M.WORKSPACE_DOMAINS[region]
  if not domain then
    return nil, ("the %s region has no workspace domain (cn: Beijing, intl: Singapore)"):format(tostring(region))
  end
  if type(id) ~= "string" or #id > 63 or not id:find("^%w[%w-]*$") or id:find("-$") then
    return nil, ("%q is not a workspace ID (letters, digits and hyphens, as the console's Workspace Details "
      .. "page shows it)"):format(tostring(id))
  end
  return domain:format(id:lower())
end

--- The dialect each region speaks: `dashscope` or `openai`.
-- Every other provider (a `client.region` of a provider's name) speaks
-- OpenAI's dialect, with the differences its `PROVIDERS` entry names.
M.DIALECT = { cn = "dashscope", intl = "dashscope", openai = "openai", azure = "openai", groq = "openai",
              together = "openai", siliconflow = "openai", zhipu = "openai", moonshot = "openai",
              cerebras = "openai", novita = "openai", litellm = "openai" }

--- Every batch endpoint, with the field a line's body must hold (besides
-- `model`, which moderations may leave out), `also` the other fields it
-- must hold, and the dialects that take it.
M.ENDPOINT_RULES = {
  ["/v1/chat/completions"] = { field = "messages", dashscope = true, openai = true },
  ["/v1/embeddings"] = { field = "input", dashscope = true, openai = true },
  ["/v1/chat/ds-test"] = { field = "messages", dashscope = true },
  -- responses: `input` (and `model`, as every line here) required, though the
  -- real-time API leaves both optional (openai npm 6.49.0 resources/responses/
  -- responses.d.ts ResponseCreateParamsBase): a batch line without them runs
  -- a stored prompt's defaults at best, so lbatch refuses it
  ["/v1/responses"] = { field = "input", openai = true },
  ["/v1/completions"] = { field = "prompt", openai = true },
  ["/v1/moderations"] = { field = "input", model_optional = true, openai = true },
  -- The rest of BatchCreateParams.endpoint's union (openai npm 6.49.0
  -- resources/batches.d.ts: "/v1/responses, /v1/chat/completions,
  -- /v1/embeddings, /v1/completions, /v1/moderations, /v1/images/generations,
  -- /v1/images/edits, and /v1/videos are supported"). Their fields:
  -- resources/images.d.ts ImageGenerateParams (prompt), ImageEditParams
  -- (image and prompt), resources/videos.d.ts VideoCreateParams (prompt).
  -- `model` is optional there (dall-e-2, sora-2 by default): a batch line
  -- must name it here, so the default is never a silent guess.
  ["/v1/images/generations"] = { field = "prompt", openai = true },
  ["/v1/images/edits"] = { field = "prompt", also = { "image" }, openai = true },
  ["/v1/videos"] = { field = "prompt", openai = true },
  -- Azure's documents write the urls without /v1 (MicrosoftDocs/azure-ai-docs, how-to/batch.md)
  ["/chat/completions"] = { field = "messages" },
  ["/embeddings"] = { field = "input" },
  -- Zhipu's (docs.bigmodel.cn batch API: endpoint and each line's url)
  ["/v4/chat/completions"] = { field = "messages" },
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

--- Limits profiles, by name. Each: `endpoints` (a set), `max_lines`,
-- `max_bytes`, `max_line_bytes`, the window's hours, the rates a minute,
-- and where they apply `chat_url` (the writer's default url), `no_bom`,
-- `max_files`.
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

local function set(...)
  local t = {}
  for _, k in ipairs({ ... }) do t[k] = true end
  return t
end

-- A profile of OpenAI's rates with the provider's own numbers over them.
local function like_openai(name, t)
  local p = { name = name, dialect = "openai", max_line_bytes = 200 * MB,
              create_per_minute = 1000, running = 1000, retrieve_per_minute = 1000, cancel_per_minute = 1000,
              list_per_minute = 1000, min_window_hours = 24, max_window_hours = 24 }
  for k, v in pairs(t) do p[k] = v end
  return p
end

local CHAT = set("/v1/chat/completions")
-- Each provider's numbers, from the source its PROVIDERS entry names.
M.PROFILES.azure = like_openai("azure", { endpoints = set("/chat/completions", "/embeddings", "/v1/chat/completions",
  "/v1/embeddings", "/v1/responses"), chat_url = "/chat/completions", max_lines = 100000,
  max_bytes = 200 * MB, no_bom = true,
  max_files = 500, one_model = true })
M.PROFILES.groq = like_openai("groq", { endpoints = CHAT, max_lines = 50000, max_bytes = 100 * MB,
  max_window_hours = 7 * 24 })
M.PROFILES.together = like_openai("together", { endpoints = CHAT, max_lines = 50000, max_bytes = 100 * MB })
M.PROFILES.siliconflow = like_openai("siliconflow", { endpoints = CHAT, max_lines = 5000, max_bytes = 1024 * MB,
  max_window_hours = 336 })
M.PROFILES.zhipu = like_openai("zhipu", { endpoints = set("/v4/chat/completions"), chat_url = "/v4/chat/completions",
  max_lines = 50000,
  max_bytes = 100 * MB })
M.PROFILES.moonshot = like_openai("moonshot", { endpoints = CHAT, max_lines = 50000, max_bytes = 100 * MB,
  max_files = 1000, one_model = true })
M.PROFILES.cerebras = like_openai("cerebras", { endpoints = CHAT, max_lines = 50000, max_bytes = 200 * MB })
M.PROFILES.novita = like_openai("novita", { endpoints = CHAT, max_lines = 50000, max_bytes = 100 * MB,
  max_window_hours = 48 })
M.PROFILES.litellm = like_openai("litellm", { endpoints = endpoints_of("openai"), max_lines = 50000,
  max_bytes = 200 * MB })

-- a table's keys, sorted and joined, for messages
local function names_of(t)
  local out = {}
  for k in pairs(t) do out[#out + 1] = k end
  table.sort(out)
  return table.concat(out, ", ")
end

--- The names of every profile, sorted, for messages.
-- @treturn string "azure, cerebras, ..."
function M.profile_names() return names_of(M.PROFILES) end

--- Every provider: where it is and how it differs from OpenAI, as data.
-- Each entry: `base_url` (nil: the caller gives it), `regions` (region ->
-- base URL), `region` (the default one), `prefix` (the path before
-- `/files` and `/batches` on the provider's host, which the emulator's
-- dialect answers on), `auth` (`bearer`, or `api-key` for Azure's
-- header), `query` (parameters on every request), `key` (the environment
-- variables of the provider's own key, as its SDK reads them, first found
-- wins; a key set there also names the provider, see `lbatch.config`), `base_env` (the variable of the
-- base URL), `limits` (a profile), `upload` (`multipart`, or `presigned`:
-- Together's three steps), `purpose` (of an input file), `answers` (how to
-- normalise its answers, see `lbatch.http.normalise`: `statuses` raw ->
-- OpenAI's name, `unwrap` the field a create's answer wraps the batch in,
-- `list = "array"` a list answered as a bare array, `progress` a percent
-- field instead of `request_counts`), `window_default` (the window of a
-- create that gives none, where it may be left out), and `source` (what
-- each fact was checked against).
M.PROVIDERS = {
  dashscope = { regions = { cn = M.REGIONS.cn, intl = M.REGIONS.intl }, region = "cn", prefix = "/compatible-mode/v1",
    key = { "DASHSCOPE_API_KEY" }, limits = "dashscope",
    -- Batch Chat (help.aliyun.com/zh/model-studio/openai-compatible-batch-chat,
    -- alibabacloud.com/help/en/model-studio/openai-compatible-batch-chat): one
    -- chat request a call, held in the service's queue until answered, at half
    -- the real-time price, Beijing (cn) only; the wait 3,600 s unless a custom
    -- one of 60 to 3,600 s is asked for. The document's excerpt read here ends
    -- before its example, so the name of the request header that asks for it is
    -- taken from the header the service answers with (`x-dashscope-timeout:
    -- 3600`, seen in recorded answers): unconfirmed, and sent only when a wait
    -- is asked for (lbatch.impl.orchestration.batchchat).
    batch_chat_url = "https://batch.dashscope.aliyuncs.com/compatible-mode/v1", batch_chat_region = "cn",
    batch_chat_wait = { default = 3600, min = 60, max = 3600, header = "X-DashScope-Timeout" },
    source = "Model Studio batch documents; the service's recorded answers (spec/fixtures/recorded)" },
  openai = { base_url = M.REGIONS.openai, prefix = "/v1", key = { "OPENAI_API_KEY" },
    limits = "openai", source = "openai (npm 6.49.0) and OpenAI's OpenAPI document" },
  -- v1: {endpoint}/openai/v1, no api-version; legacy (api_version given):
  -- {endpoint}/openai?api-version=...; the api-key header. openai (npm
  -- 6.49.0) azure.js: baseURL `${endpoint}/openai`, defaultQuery
  -- api-version, authHeaders `api-key`, AZURE_OPENAI_ENDPOINT and
  -- AZURE_OPENAI_API_KEY. Limits, BOM, window: azure-ai-docs how-to/batch.md,
  -- includes/global-batch-limits.md (documents alone).
  azure = { prefix = "/openai/v1", legacy_prefix = "/openai", api_version = "2024-10-21", auth = "api-key",
    key = { "AZURE_OPENAI_API_KEY" }, base_env = "AZURE_OPENAI_ENDPOINT", limits = "azure",
    answers = { empty_ids = true },
    source = "openai (npm 6.49.0) lib azure.js; azure-ai-docs how-to/batch.md, includes/global-batch-limits.md" },
  -- groq-sdk (npm 1.6.0): base https://api.groq.com, paths /openai/v1/batches,
  -- /openai/v1/files; src/resources/batches.ts: completion_window "24h" to
  -- "7d", endpoint /v1/chat/completions only, files up to 100 MB; GROQ_API_KEY
  groq = { base_url = "https://api.groq.com/openai/v1", prefix = "/openai/v1", key = { "GROQ_API_KEY" },
    limits = "groq", source = "groq-sdk (npm 1.6.0) resources/batches, resources/files; groq-python batches.py" },
  -- together-ai (npm 0.52.0): lib/upload.js (POST /files?file_name&file_type&purpose
  -- answers 302 with Location and X-Together-File-Id, PUT the bytes, then
  -- GET /files/{id}; together-py also POSTs /files/{id}/preprocess),
  -- purpose batch-api; resources/batches.d.ts: create answers {job, warning},
  -- statuses VALIDATING IN_PROGRESS COMPLETED FAILED EXPIRED CANCELLED,
  -- times as strings, progress, the list an Array<BatchJob>
  -- (src/resources/batches.ts: completion_window optional in BatchCreateParams)
  together = { base_url = "https://api.together.xyz/v1", prefix = "/v1", key = { "TOGETHER_API_KEY" },
    limits = "together", upload = "presigned", purpose = "batch-api", window_default = "24h",
    answers = { unwrap = "job", list = "array", progress = true, times = true },
    source = "together-ai (npm 0.52.0) lib/upload.js, resources/batches.d.ts; together-py resources/batches.py" },
  -- docs.siliconflow.cn batch guide (documents alone): in_queue, null
  -- request_counts, errors as {code, message, data}
  siliconflow = { base_url = "https://api.siliconflow.cn/v1", prefix = "/v1", key = { "SILICONFLOW_API_KEY" },
    limits = "siliconflow", answers = { statuses = { in_queue = "in_progress" }, progress = true },
    source = "docs.siliconflow.cn batch; api-docs.siliconflow.cn batches-post, batches-get" },
  -- docs.bigmodel.cn batch API (documents alone)
  zhipu = { base_url = "https://open.bigmodel.cn/api/paas/v4", prefix = "/api/paas/v4", key = { "ZHIPUAI_API_KEY" },
    limits = "zhipu", endpoint = "/v4/chat/completions", source = "docs.bigmodel.cn batch API pages" },
  -- platform.kimi.ai batch guide (documents alone)
  moonshot = { regions = { intl = "https://api.moonshot.ai/v1", cn = "https://api.moonshot.cn/v1" }, region = "intl",
    prefix = "/v1", key = { "MOONSHOT_API_KEY" }, limits = "moonshot",
    source = "platform.kimi.ai docs/api/batch-create, guide/use-batch-api" },
  -- @cerebras/cerebras_cloud_sdk (npm 1.91.0): CEREBRAS_API_KEY, CEREBRAS_BASE_URL,
  -- but no files or batches resource; the rest from inference-docs.cerebras.ai
  cerebras = { base_url = "https://api.cerebras.ai/v1", prefix = "/v1", key = { "CEREBRAS_API_KEY" },
    limits = "cerebras", source = "@cerebras/cerebras_cloud_sdk (npm 1.91.0) index.js; inference-docs.cerebras.ai" },
  -- novita.ai docs llm-batch-api (documents alone): PROGRESS, string times
  novita = { base_url = "https://api.novita.ai/openai/v1", prefix = "/openai/v1", key = { "NOVITA_API_KEY" },
    limits = "novita", answers = { statuses = { progress = "in_progress" }, times = true },
    source = "novita.ai docs llm-batch-api, create-batch" },
  -- BerriAI/litellm batch proxy docs (documents alone): OpenAI's shape
  litellm = { prefix = "/v1", key = { "LITELLM_API_KEY" }, base_env = "LITELLM_BASE_URL", limits = "litellm",
    source = "BerriAI/litellm docs batches (proxy)" },
}
for name, p in pairs(M.PROVIDERS) do
  p.name, p.auth, p.upload = name, p.auth or "bearer", p.upload or "multipart"
  p.purpose, p.answers = p.purpose or "batch", p.answers or {}
end

--- The names of every provider, sorted, for messages.
-- @treturn string
function M.provider_names() return names_of(M.PROVIDERS) end

--- The current DashScope limits (the `dashscope` profile).
M.LIMITS = M.PROFILES.dashscope

--- A profile by name, or the default of a region (`cn`, `intl`: dashscope;
-- `openai`: openai) or of a provider (its `limits`).
-- @tparam ?string name a profile or a region (default `dashscope`)
-- @treturn ?table the profile, nil when unknown
function M.profile(name)
  if name == nil then return M.PROFILES.dashscope end
  if M.PROFILES[name] then return M.PROFILES[name] end
  if M.PROVIDERS[name] then return M.PROFILES[M.PROVIDERS[name].limits] end
  local dialect = M.DIALECT[name]
  return dialect and M.PROFILES[dialect] or nil
end

--- The models the DashScope regions list for batch, by endpoint (Model
-- Studio's batch documents, 2026; cn checked against the newest,
-- help.aliyun.com/zh/model-studio/batch-interfaces-compatible-with-openai:
-- qwen3.8-max and -flash, qwen3.7-text-embedding; intl: "qwen-max,
-- qwen-plus, qwen-flash, qwen-turbo"). Names an older document listed stay:
-- lists change, and a model outside them is a warning, not an error.
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

--- An ISO-8601 / RFC 3339 time (`2024-05-01T12:00:00.123Z`,
-- `2024-05-01 12:00:00+08:00`; no zone is UTC) as whole seconds since the
-- epoch.
-- @tparam string s the time
-- @treturn ?integer seconds, or nil when `s` is not in that form
function M.iso8601(s)
  local y, mo, d, rest = s:match("^%s*(%d%d%d%d)%-(%d%d)%-(%d%d)(.*)$")
  if not y then return nil end
  local h, mi, se, tail = 0, 0, 0, rest
  if rest ~= "" then
    h, mi, se, tail = rest:match("^[Tt ](%d%d):(%d%d):?(%d?%d?)(.*)$")
    if not h then return nil end
    tail = tail:gsub("^[.,]%d+", "")
  end
  local off = 0
  if tail ~= "" and tail ~= "Z" and tail ~= "z" then
    local sign, oh, om = tail:match("^%s*([+-])(%d%d):?(%d%d)$")
    if not sign then
      sign, oh = tail:match("^%s*([+-])(%d%d)$")
      om = "00"
    end
    if not sign then return nil end
    off = (tonumber(oh) * 3600 + tonumber(om) * 60) * (sign == "-" and -1 or 1)
  end
  return epoch(tonumber(y), tonumber(mo), tonumber(d), tonumber(h), tonumber(mi), tonumber(se ~= "" and se or 0)) - off
end

return M
