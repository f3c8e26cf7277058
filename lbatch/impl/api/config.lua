--- A client's options: checked once, with the environment's defaults.
--
-- Wrong option values raise at `lbatch.new` (a programming error), with a
-- message naming the option. Nothing here touches the network.
-- @module lbatch.impl.api.config
local service = require "lbatch.impl.api.service"
local errors = require "lbatch.impl.transport.errors"

local M = {}

--- Defaults, in seconds and bytes.
M.DEFAULTS = {
  timeout = 600,             -- a whole API request (not uploads and downloads)
  connect_timeout = 10,
  stall_timeout = 30,        -- no byte moved for this long: the transfer fails
  max_retries = 2,
  retry_after_cap = 60,      -- a longer Retry-After is returned to the caller
  max_connections = 16,      -- connections (HTTP/1.1: transfers at once)
  max_streams = 100,         -- transfers at once on one HTTP/2 connection
  max_response_bytes = 64 * 1024 * 1024,   -- an answer kept in memory
  fresh_window = 30,         -- an id made a moment ago, "not there": asked again so long
}

-- a wrong option: thrown to this module's edge (errors.protect) and
-- returned, so the public function raises it at its own caller's line
local fail, guarded = errors.throw, errors.protect

local function env(k)
  local v = os.getenv(k)
  if v ~= "" then return v end
end

-- a number > 0 (or >= 0), finite, and whole when `whole`
local function number(opts, k, whole, zero_ok)
  local v = opts[k]
  if v == nil then return M.DEFAULTS[k] end
  if type(v) ~= "number" then fail(("%s must be a number (got %s)"):format(k, type(v))) end
  if v ~= v or v == math.huge or v < 0 or (v == 0 and not zero_ok) then
    fail(("%s must be a number %s 0 (got %s)"):format(k, zero_ok and ">=" or ">", tostring(v)))
  end
  if whole and v ~= math.floor(v) then fail(("%s must be a whole number (got %s)"):format(k, tostring(v))) end
  return v
end

local function string_opt(opts, k)
  local v = opts[k]
  if v ~= nil and type(v) ~= "string" then fail(("%s must be a string (got %s)"):format(k, type(v))) end
  return v
end

-- A header name is a token; no value holds CR, LF or NUL (they would
-- smuggle another header into the request).
local function header_line(name, value)
  if type(name) ~= "string" or not name:find("^[%w!#$%%&'*+%.^_`|~-]+$") then
    fail(("headers: %q is not a header name"):format(tostring(name)))
  end
  if type(value) ~= "string" and type(value) ~= "number" then
    fail(("headers: the value of %s must be a string"):format(name))
  end
  value = tostring(value)
  if value:find("[\r\n%z]") then fail(("headers: the value of %s holds a CR, LF or NUL"):format(name)) end
  return name .. ": " .. value
end

-- headers whose values are secrets, scrubbed like the key
local SECRET_HEADER = { "auth", "key", "token", "secret", "cookie", "password", "session" }
local function is_secret_header(name)
  name = name:lower()
  for _, w in ipairs(SECRET_HEADER) do if name:find(w, 1, true) then return true end end
  return false
end

local function headers(h, secrets)
  local lines = {}
  if h == nil then return lines end
  if type(h) ~= "table" then fail("headers must be a table") end
  for k, v in pairs(h) do
    local name, value = k, v
    if type(k) == "number" then
      if type(v) ~= "string" then fail("headers: a list entry must be a string \"Name: value\"") end
      name, value = v:match("^([^:]*):%s*(.*)$")
      if not name then fail(("headers: %q is not \"Name: value\""):format(v)) end
    end
    lines[#lines + 1] = header_line(name, value)
    if secrets and is_secret_header(name) then secrets[#secrets + 1] = tostring(value) end
  end
  table.sort(lines)
  return lines
end

--- Extra headers from an option (`{Name = "value"}` or `{"Name: value"}`).
-- @tparam table h the option
-- @tparam ?table secrets a list to add secret values to
-- @treturn {string,...} header lines, or nil and what is wrong
M.headers = guarded(headers)

local function is_loopback(host)
  return host == "localhost" or host:find("^127%.%d+%.%d+%.%d+$") ~= nil or host == "[::1]"
end

-- https://, or http:// to this machine (or with allow_http): the key
-- never crosses a network in clear by accident
local function check_base(base, allow_http)
  local scheme, host, after = base:match("^(%a[%w+.-]*)://(%[[^%]/]*%])(.?)")   -- an IPv6 address: [::1]
  if not (scheme and (after == "" or (":/?#"):find(after, 1, true))) then
    scheme, host = base:match("^(%a[%w+.-]*)://([^/:?#]*)")
  end
  scheme = scheme and scheme:lower()
  if scheme ~= "https" and scheme ~= "http" then
    fail(("base_url must start with https:// (got %q)"):format(base))
  end
  if scheme == "http" and not is_loopback(host:lower()) and not allow_http then
    fail(("base_url %q would send the API key unencrypted: use https://, or allow_http = true"):format(base))
  end
end

-- every option lbatch.new takes: a misspelt one raises instead of being ignored
local KNOWN = { api_key = true, region = true, base_url = true, allow_http = true, limits = true,
                poll_budget = true, timeout = true, connect_timeout = true, stall_timeout = true,
                transfer_timeout = true, max_retries = true, retry_after_cap = true, max_connections = true,
                max_streams = true, max_response_bytes = true, headers = true, cainfo = true, capath = true,
                proxy = true, noproxy = true, host = true, scheduler = true, fresh_window = true,
                provider = true, api_version = true, workspace = true }

-- The provider no option names follows from the key the environment
-- holds: a key goes to its own provider only (each provider's variables:
-- service.PROVIDERS[name].key). Several keys: the default provider with
-- its own, said in a warning; no default key among them, or a base URL
-- with another provider's key: the caller names the provider.
local DEFAULT = "dashscope"

-- every provider's key found in the environment, by provider name
local function keys_set()
  local names, found = {}, {}
  for name in pairs(service.PROVIDERS) do names[#names + 1] = name end
  table.sort(names)
  for _, name in ipairs(names) do
    for _, var in ipairs(service.PROVIDERS[name].key) do
      if env(var) then found[#found + 1] = { provider = name, var = var } break end
    end
  end
  return found
end

local function vars(found)
  local t = {}
  for _, f in ipairs(found) do t[#t + 1] = f.var end
  return table.concat(t, ", ")
end

local function unclear(message)
  fail(errors.new({ kind = "config", code = "provider_unclear", param = "provider", message = message
    .. ": name the provider (the command: --provider NAME; lbatch.new: provider = NAME)" }))
end

-- the provider from the keys set (nil: none set), and a warning
local function from_keys(base)
  local found = keys_set()
  if #found == 0 then return nil end
  for _, f in ipairs(found) do
    if f.provider == DEFAULT then
      if #found == 1 then return DEFAULT end
      return DEFAULT, ("%s are set and no provider is named: using %s with %s (--provider or provider = picks another)")
        :format(vars(found), DEFAULT, f.var)
    end
  end
  if base then
    unclear(("a base URL (--base-url, LBATCH_BASE_URL or base_url) is given and the key found is %s, not %s's")
      :format(#found > 1 and vars(found) or (found[1].var .. ", " .. found[1].provider .. "'s"), DEFAULT))
  end
  if #found > 1 then unclear(("%s are set and no provider is named"):format(vars(found))) end
  return found[1].provider
end

-- workspace = ID: DashScope's workspace domain of the region (named: two
-- regions have one, and the ID says nothing of which); the key goes to
-- that host alone
local function workspace_base(p, region, workspace)
  if p.name ~= "dashscope" then fail(("workspace is DashScope's, not %s's"):format(p.name)) end
  if region == nil then
    fail("workspace needs region: cn (https://{ID}.cn-beijing.maas.aliyuncs.com) or intl "
      .. "(https://{ID}.ap-southeast-1.maas.aliyuncs.com), as the console's Workspace Details page shows")
  end
  local base, why = service.workspace_url(region, workspace)
  if not base then fail("workspace: " .. why) end
  return p, region, region, base, false, nil
end

-- the provider, its region, the base URL the options choose, and
-- whether the provider was found by its key alone (and a warning)
local function where(opts)
  local name, found, warning = string_opt(opts, "provider"), false, nil
  local workspace = string_opt(opts, "workspace")
  if name == nil then
    if opts.region ~= nil or opts.api_key ~= nil or workspace then
      name = opts.region == "openai" and "openai" or DEFAULT
    else
      local base = opts.base_url or env("LBATCH_BASE_URL")
      name, warning = from_keys(base ~= nil and base ~= "")
      found = name ~= nil
      name = name or DEFAULT
    end
  end
  local p = service.PROVIDERS[name]
  if not p then fail(("provider must be one of %s (got %q)"):format(service.provider_names(), name)) end
  local region = opts.region
  if workspace then return workspace_base(p, region, workspace) end
  if name == "dashscope" or name == "openai" then
    region = region or (name == "openai" and "openai" or "cn")
    if not service.REGIONS[region] or (name == "openai") ~= (region == "openai") then
      fail("region must be cn, intl or openai")
    end
    return p, region, region, service.REGIONS[region], found, warning
  end
  if region ~= nil and not (p.regions and p.regions[region]) then
    local r = {}
    for k in pairs(p.regions or {}) do r[#r + 1] = k end
    table.sort(r)
    fail(("region: %s has %s"):format(name, #r > 0 and ("the regions " .. table.concat(r, ", ")) or "no regions"))
  end
  region = region or p.region
  return p, name, region, p.regions and p.regions[region] or p.base_url, found, warning
end

-- the key: the api_key option, else the provider's own variable
local function api_key(opts, provider, unnamed)
  local key = string_opt(opts, "api_key")
  if not key then
    for _, k in ipairs(provider.key) do
      key = env(k)
      if key then break end
    end
  end
  if not key or key == "" then      -- what the environment lacks: a runtime failure, returned
    local others = {}
    for _, f in ipairs(keys_set()) do
      if f.provider ~= provider.name then others[#others + 1] = ("%s (%s)"):format(f.var, f.provider) end
    end
    local names = table.concat(provider.key, " (or ") .. (#provider.key > 1 and ")" or "")
    local hint = #others > 0 and ("; set but not %s's: %s (--provider or provider = names one)")
      :format(provider.name, table.concat(others, ", "))
      or unnamed and ", or another provider's (OPENAI_API_KEY, GROQ_API_KEY, ...: the provider follows from it)" or ""
    fail(errors.new({ kind = "config", code = "no_api_key", param = "api_key",
      message = ("no API key: pass api_key or set %s%s"):format(names, hint) }))
  end
  if key:find("[\r\n%z]") then fail("api_key holds a CR, LF or NUL") end
  return key
end

--- A `host` option (see `lbatch.loop`), checked: nil, or a table of
-- `waiter` and `notify` functions. Throws what is wrong (see `errors.throw`).
-- @param host the option
-- @return host
function M.host(host)
  if host ~= nil then
    if type(host) ~= "table" then fail("host must be a table") end
    for _, k in ipairs({ "waiter", "notify" }) do
      if host[k] ~= nil and type(host[k]) ~= "function" then fail("host." .. k .. " must be a function") end
    end
  end
  return host
end

--- A number option (`max_connections`, `timeout`, ...), checked, or its
-- default. Throws what is wrong.
-- @tparam table opts the options
-- @tparam string k the option's name
-- @tparam[opt] boolean whole it must be a whole number
-- @tparam[opt] boolean zero_ok 0 is allowed
-- @treturn number
M.number = number

local function new(opts)
  if type(opts) ~= "table" then fail("opts must be a table") end
  for k in pairs(opts) do
    if not KNOWN[k] then fail(("unknown option %s"):format(type(k) == "string" and k or "[" .. tostring(k) .. "]")) end
  end
  local provider, region, provider_region, default_base, by_key, warning = where(opts)
  local key = api_key(opts, provider, not by_key and opts.provider == nil and opts.region == nil)
  local api_version = string_opt(opts, "api_version")
  if api_version ~= nil and not provider.legacy_prefix then
    fail(("api_version is Azure's (the legacy API), not %s's"):format(provider.name))
  end
  local base = string_opt(opts, "base_url") or env("LBATCH_BASE_URL")
  if opts.workspace and base and base ~= "" then
    fail(("workspace and %s both name a host: give one"):format(opts.base_url and "base_url" or "LBATCH_BASE_URL"))
  end
  if (not base or base == "") and provider.base_env then base = env(provider.base_env) end
  if not base or base == "" then base = default_base end
  if not base then
    fail(("base_url: %s has no fixed one: pass base_url%s"):format(provider.name,
      provider.base_env and (" or set " .. provider.base_env) or ""))
  end
  base = base:gsub("/+$", "")
  -- Azure: the resource's endpoint takes the path prefix of its API
  -- (v1, or the legacy one with api_version)
  local query
  if provider.legacy_prefix then
    local prefix = api_version and provider.legacy_prefix or provider.prefix
    if not base:find("/openai", 1, true) then base = base .. prefix end
    if api_version then query = "api-version=" .. api_version:gsub("[^%w%-%._~]", "") end
  end
  check_base(base, opts.allow_http)
  local proxy = string_opt(opts, "proxy")
  local secret_list = { key }
  if proxy then
    local cred = proxy:match("^%a[%w+.-]*://([^@/]+)@") or proxy:match("^([^@/]+)@")
    if cred then secret_list[#secret_list + 1] = cred end
  end
  local auth = provider.auth == "api-key" and ("api-key: " .. key) or ("Authorization: Bearer " .. key)
  local lines = { auth, "Accept: application/json",
                  "User-Agent: lbatch/" .. require("lbatch.impl.transport.version") }
  for _, h in ipairs(headers(opts.headers, secret_list)) do lines[#lines + 1] = h end
  local host = M.host(opts.host)
  if opts.scheduler ~= nil then
    if type(opts.scheduler) ~= "table" then fail("scheduler must be a scheduler (lbatch.scheduler())") end
    for _, k in ipairs({ "host", "max_connections", "max_streams" }) do
      if opts[k] ~= nil then fail(k .. " is the scheduler's: pass it to lbatch.scheduler{}, not with scheduler =") end
    end
  end
  local limits = string_opt(opts, "limits") or provider.limits
  local profile = service.PROFILES[limits]
  if not profile then fail("limits must be one of " .. service.profile_names()) end
  local budget = opts.poll_budget
  if budget == nil then
    budget = math.min(profile.list_per_minute or math.huge, profile.retrieve_per_minute or math.huge)
  else budget = number(opts, "poll_budget") end
  local cfg = {
    base_url = base, region = region, limits = profile.name, poll_budget = budget,
    provider = provider.name, provider_region = provider_region, query = query,
    provider_by_key = by_key, warning = warning,
    timeout = number(opts, "timeout"),
    connect_timeout = number(opts, "connect_timeout"),
    stall_timeout = number(opts, "stall_timeout"),
    transfer_timeout = opts.transfer_timeout ~= nil and number(opts, "transfer_timeout") or nil,
    max_retries = number(opts, "max_retries", true, true),
    retry_after_cap = number(opts, "retry_after_cap", false, true),
    max_connections = number(opts, "max_connections", true),
    max_streams = number(opts, "max_streams", true),
    max_response_bytes = number(opts, "max_response_bytes", true),
    fresh_window = number(opts, "fresh_window", false, true),
    cainfo = string_opt(opts, "cainfo") or env("SSL_CERT_FILE") or env("CURL_CA_BUNDLE"),
    capath = string_opt(opts, "capath") or env("SSL_CERT_DIR"),
    proxy = proxy,
    noproxy = string_opt(opts, "noproxy"),
    host = host,
  }
  return cfg, { key = key, headers = lines, list = secret_list }
end

--- Check `opts` and fill in defaults and the environment.
-- @tparam table opts the options of `lbatch.new`
-- @treturn table the configuration (no secrets in it; `provider_by_key`:
-- the provider came from the key set, `warning`: what was chosen when
-- several keys are set, for the caller to show once), or nil and what is
-- wrong (an error object of kind `config` when the environment lacks the
-- key, `no_api_key`, or leaves the provider unclear, `provider_unclear`)
-- @treturn table the secrets: `key`, `headers` (every request's), `list` (to scrub)
M.new = guarded(new)

return M
