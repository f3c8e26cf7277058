-- lbatch.config: a client's options, checked once (no server, no nginx).
local H = require "helper"
local config = require "lbatch.impl.api.config"
local service = require "lbatch.impl.api.service"
local version = require "lbatch.impl.transport.version"

-- options with a key and an https base URL, plus `o`
local function opts(o)
  local t = { api_key = "sk-test", base_url = "https://api.example.com/v1" }
  for k, v in pairs(o or {}) do t[k] = v end
  return t
end

-- config.new in another process, with only the environment given (the
-- variables config reads cleared first): prints the fields asked for
local CLEARED = { "LBATCH_BASE_URL", "SSL_CERT_FILE", "CURL_CA_BUNDLE", "SSL_CERT_DIR" }
for _, p in pairs(service.PROVIDERS) do
  for _, k in ipairs(p.key) do CLEARED[#CLEARED + 1] = k end
  if p.base_env then CLEARED[#CLEARED + 1] = p.base_env end
end
-- `warning`: the configuration's warning printed last
local function in_env(vars, lua_opts, warning)
  local dir = H.tmpdir()
  local script = H.write(dir .. "/c.lua", ([[
    local cfg, s = require("lbatch.impl.api.config").new(%s)
    if not cfg then io.write("error: ", type(s) == "table" and (s.kind .. " " .. s.code .. ": " .. s.message) or s) return end
    io.write(cfg.base_url, "|", s.key, "|", cfg.limits, "|", tostring(cfg.cainfo), "|", tostring(cfg.capath))
    if %s then io.write("|", tostring(cfg.warning)) end
  ]]):format(lua_opts or "{}", tostring(warning == true)))
  local cmd = { "cd", H.q(H.root), "&& env" }
  for _, k in ipairs(CLEARED) do cmd[#cmd + 1] = "-u " .. k end
  for k, v in pairs(vars) do cmd[#cmd + 1] = H.q(k .. "=" .. v) end
  cmd[#cmd + 1] = H.lua .. " " .. H.q(script) .. " 2>&1"
  local out = H.sh(table.concat(cmd, " "))
  H.rm_rf(dir)
  return out
end

describe("config.new", function()
  it("fills in every default, and keeps the key out of the configuration", function()
    local cfg, secrets = assert(config.new(opts()))
    for k, v in pairs(config.DEFAULTS) do assert.are.equal(v, cfg[k], k) end
    assert.is_nil(cfg.transfer_timeout)
    assert.are.equal("cn", cfg.region)
    assert.are.equal("dashscope", cfg.limits)
    assert.are.equal("sk-test", secrets.key)
    for k, v in pairs(cfg) do assert.are_not.equal("sk-test", v, k) end
    assert.are.same({ "sk-test" }, secrets.list)
  end)

  it("sends the key, JSON and its version in every request's headers", function()
    local _, secrets = assert(config.new(opts()))
    assert.are.same({ "Authorization: Bearer sk-test", "Accept: application/json", "User-Agent: lbatch/" .. version },
                    secrets.headers)
  end)

  it("refuses an unknown (misspelt) option by name, and a non-table", function()
    local cfg, err = config.new(opts({ max_retry = 3 }))
    assert.is_nil(cfg)
    assert.are.equal("unknown option max_retry", err)
    assert.are.equal("unknown option [1]", select(2, config.new(opts({ "x" }))))
    assert.are.equal("opts must be a table", select(2, config.new("cn")))
  end)

  it("returns what is wrong instead of raising, for each wrong option", function()
    local wrong = {
      { { region = "eu" }, "region must be cn, intl or openai" },
      { { limits = "fast" }, "limits must be one of azure, cerebras, dashscope, dashscope-strict, groq, litellm, moonshot, novita, "
        .. "openai, siliconflow, together, zhipu" },
      { { api_key = 42 }, "api_key must be a string (got number)" },
      { { api_key = "sk\r\nX-Evil: 1" }, "api_key holds a CR, LF or NUL" },
      { { base_url = 7 }, "base_url must be a string (got number)" },
      { { host = "luv" }, "host must be a table" },
      { { host = { waiter = true } }, "host.waiter must be a function" },
      { { host = { notify = "x" } }, "host.notify must be a function" },
      { { proxy = {} }, "proxy must be a string (got table)" },
    }
    for _, case in ipairs(wrong) do
      local cfg, err = config.new(opts(case[1]))
      assert.is_nil(cfg, case[2])
      assert.are.equal(case[2], err)
    end
    assert.is_table(config.new(opts({ host = { waiter = function() end, notify = function() end } })))
  end)

  it("takes numbers > 0, finite; whole where a count; 0 where it means none", function()
    local bad = {
      { "timeout", 0, "timeout must be a number > 0 (got 0)" },
      { "timeout", -1, "timeout must be a number > 0 (got -1)" },
      { "timeout", math.huge, "timeout must be a number > 0 (got inf)" },
      { "timeout", "10", "timeout must be a number (got string)" },
      { "connect_timeout", 0 },
      { "stall_timeout", -0.5 },
      { "transfer_timeout", 0 },
      { "poll_budget", 0 },
      { "max_retries", -1, "max_retries must be a number >= 0 (got -1)" },
      { "max_retries", 1.5, "max_retries must be a whole number (got 1.5)" },
      { "retry_after_cap", -1 },
      { "max_connections", 0 },
      { "max_connections", 2.5 },
      { "max_streams", 0 },
      { "max_response_bytes", 1024.5 },
    }
    for _, case in ipairs(bad) do
      local cfg, err = config.new(opts({ [case[1]] = case[2] }))
      assert.is_nil(cfg, case[1] .. " = " .. tostring(case[2]))
      assert.matches("^" .. case[1] .. " must be", err)
      if case[3] then assert.are.equal(case[3], err) end
    end
    local nan = select(2, config.new(opts({ timeout = 0 / 0 })))
    assert.matches("^timeout must be a number > 0", nan)
    local cfg = assert(config.new(opts({ max_retries = 0, retry_after_cap = 0, timeout = 0.25, transfer_timeout = 3600,
                                         max_connections = 1, max_streams = 1, poll_budget = 2.5 })))
    assert.are.equal(0, cfg.max_retries)
    assert.are.equal(0, cfg.retry_after_cap)
    assert.are.equal(0.25, cfg.timeout)
    assert.are.equal(3600, cfg.transfer_timeout)
    assert.are.equal(1, cfg.max_connections)
    assert.are.equal(2.5, cfg.poll_budget)
  end)

  it("polls within the profile's list and retrieve rates by default", function()
    assert.are.equal(100, config.new(opts()).poll_budget)                            -- list 100, retrieve 1000
    assert.are.equal(100, config.new(opts({ limits = "dashscope-strict" })).poll_budget)   -- list 100, retrieve 300
    local openai = config.new(opts({ region = "openai" }))
    assert.are.equal("openai", openai.limits)
    assert.are.equal(1000, openai.poll_budget)
    assert.are.equal("dashscope", config.new(opts({ region = "intl" })).limits)
    -- a profile other than the region's default
    assert.are.equal("dashscope-strict", config.new(opts({ region = "openai", limits = "dashscope-strict" })).limits)
  end)
end)

describe("config.new: base_url", function()
  it("is the region's when none is given, and a given one wins (trailing slashes dropped)", function()
    for region, url in pairs(service.REGIONS) do
      local var = region == "openai" and "OPENAI_API_KEY" or "DASHSCOPE_API_KEY"
      local out = in_env({ [var] = "k" }, ("{ region = %q }"):format(region))
      assert.are.equal(url .. "|k|" .. service.DIALECT[region] .. "|nil|nil", out)
    end
    assert.are.equal(service.REGIONS.cn, (in_env({ DASHSCOPE_API_KEY = "k" }):match("^[^|]*")))
    assert.are.equal("https://a.example/v1", config.new(opts({ base_url = "https://a.example/v1///" })).base_url)
  end)

  it("comes from LBATCH_BASE_URL when not given; the option wins over it", function()
    assert.are.equal("https://env.example/v1|k|dashscope|nil|nil",
                     in_env({ DASHSCOPE_API_KEY = "k", LBATCH_BASE_URL = "https://env.example/v1/" }))
    assert.matches("^https://opt.example/v1|", in_env({ DASHSCOPE_API_KEY = "k", LBATCH_BASE_URL = "https://env.example" },
                                                     '{ base_url = "https://opt.example/v1" }'))
    -- an empty variable is no variable
    assert.matches("^" .. service.REGIONS.cn:gsub("%p", "%%%0") .. "|",
                   in_env({ DASHSCOPE_API_KEY = "k", LBATCH_BASE_URL = "" }))
  end)

  it("refuses http:// to another machine, unless allow_http", function()
    for _, url in ipairs({ "http://api.example.com/v1", "http://127.0.0.1.evil.example/v1", "http://localhost@evil.example/",
                           "http://localhost.evil.example/v1", "http://[::1].evil.example/", "http://10.0.0.1:8080/v1",
                           "http://[::2]/v1", "http://127.1/v1" }) do
      local cfg, err = config.new(opts({ base_url = url }))
      assert.is_nil(cfg, url)
      assert.matches("would send the API key unencrypted", err, 1, true)
      assert.is_table(config.new(opts({ base_url = url, allow_http = true })), url)
    end
  end)

  it("takes http:// to this machine: localhost, 127.x.y.z, [::1], any case, any port", function()
    for _, url in ipairs({ "http://localhost/v1", "http://127.0.0.1:8089/v1", "http://127.8.9.10/v1",
                           "HTTP://LocalHost:1/v1", "http://[::1]:8080/v1", "http://[::1]/v1", "http://[::1]" }) do
      local cfg, err = config.new(opts({ base_url = url }))
      assert.is_table(cfg, url .. ": " .. tostring(err))
    end
    assert.is_table(config.new(opts({ base_url = "https://[2001:db8::1]:443/v1" })))
  end)

  it("refuses a URL that is not http(s)", function()
    for _, url in ipairs({ "ftp://api.example.com/v1", "api.example.com/v1", "file:///etc/passwd", "//x/v1" }) do
      local cfg, err = config.new(opts({ base_url = url }))
      assert.is_nil(cfg, url)
      assert.matches("base_url must start with https://", err, 1, true)
    end
    -- an empty one is none: the region's
    assert.are.equal(service.REGIONS.intl, config.new(opts({ base_url = "", region = "intl" })).base_url)
  end)
end)

describe("config.new: the API key", function()
  it("comes from the provider's own variable only: DASHSCOPE_API_KEY for DashScope, OPENAI_API_KEY for OpenAI", function()
    local both = { DASHSCOPE_API_KEY = "ds", OPENAI_API_KEY = "oa" }
    assert.matches("|ds|", in_env(both, '{ region = "cn" }'), 1, true)
    assert.matches("|ds|", in_env(both, '{ region = "intl" }'), 1, true)
    assert.matches("|oa|", in_env(both, '{ region = "openai" }'), 1, true)
    assert.matches("|oa|", in_env(both, '{ provider = "openai" }'), 1, true)
    -- never the other provider's key
    assert.are.equal("error: config no_api_key: no API key: pass api_key or set DASHSCOPE_API_KEY; set but not "
      .. "dashscope's: OPENAI_API_KEY (openai) (--provider or provider = names one)",
      in_env({ OPENAI_API_KEY = "oa" }, '{ region = "cn" }'))
    assert.matches("^error: config no_api_key: no API key: pass api_key or set OPENAI_API_KEY; ",
      in_env({ DASHSCOPE_API_KEY = "ds" }, '{ region = "openai" }'))
    assert.matches("^error: config no_api_key: no API key: pass api_key or set GROQ_API_KEY; ",
      in_env({ OPENAI_API_KEY = "oa" }, '{ provider = "groq" }'))
    assert.matches("|given|", in_env(both, '{ api_key = "given" }'), 1, true)
  end)

  it("names the provider when no option does: the one whose key is set", function()
    assert.are.equal(service.REGIONS.openai .. "|oa|openai|nil|nil", in_env({ OPENAI_API_KEY = "oa" }))
    assert.are.equal(service.REGIONS.cn .. "|ds|dashscope|nil|nil", in_env({ DASHSCOPE_API_KEY = "ds" }))
    assert.are.equal(service.REGIONS.openai .. "|oa|openai|nil|nil",
                     in_env({ DASHSCOPE_API_KEY = "", OPENAI_API_KEY = "oa" }))   -- empty: unset
    assert.are.equal(service.PROVIDERS.groq.base_url .. "|gk|groq|nil|nil", in_env({ GROQ_API_KEY = "gk" }))
    assert.matches("^https://r.example/openai/v1|ak|azure|",
                   in_env({ AZURE_OPENAI_API_KEY = "ak", AZURE_OPENAI_ENDPOINT = "https://r.example" }))
  end)

  it("with two keys and no provider named, takes the default with its own key, and says so", function()
    local out = in_env({ DASHSCOPE_API_KEY = "ds", OPENAI_API_KEY = "oa" }, nil, true)
    assert.are.equal(service.REGIONS.cn .. "|ds|dashscope|nil|nil|DASHSCOPE_API_KEY, OPENAI_API_KEY are set and no "
      .. "provider is named: using dashscope with DASHSCOPE_API_KEY (--provider or provider = picks another)", out)
    -- one key: nothing to say
    assert.matches("|nil$", in_env({ OPENAI_API_KEY = "oa" }, nil, true))
    -- no default key among several: the caller names one
    assert.are.equal("error: config provider_unclear: GROQ_API_KEY, OPENAI_API_KEY are set and no provider is named: "
      .. "name the provider (the command: --provider NAME; lbatch.new: provider = NAME)",
      in_env({ GROQ_API_KEY = "g", OPENAI_API_KEY = "oa" }))
  end)

  it("with a base URL and only another provider's key, asks for the provider by name", function()
    for _, case in ipairs({ { { LBATCH_BASE_URL = "https://proxy.example/v1" } },
                            { {}, '{ base_url = "https://proxy.example/v1" }' } }) do
      case[1].OPENAI_API_KEY = "oa"
      local out = in_env(case[1], case[2])
      assert.are.equal("error: config provider_unclear: a base URL (--base-url, LBATCH_BASE_URL or base_url) is "
        .. "given and the key found is OPENAI_API_KEY, openai's, not dashscope's: name the provider (the command: "
        .. "--provider NAME; lbatch.new: provider = NAME)", out)
      assert.is_nil(out:find("|oa|", 1, true))
    end
    assert.are.equal("https://proxy.example/v1|oa|openai|nil|nil",
                     in_env({ OPENAI_API_KEY = "oa", LBATCH_BASE_URL = "https://proxy.example/v1" }, '{ provider = "openai" }'))
    assert.are.equal("https://proxy.example/v1|ds|dashscope|nil|nil",
                     in_env({ DASHSCOPE_API_KEY = "ds", LBATCH_BASE_URL = "https://proxy.example/v1" }))
    assert.are.equal("https://proxy.example/v1|x|dashscope|nil|nil",
                     in_env({ OPENAI_API_KEY = "oa" }, '{ api_key = "x", base_url = "https://proxy.example/v1" }'))
  end)

  it("is required: its absence is the environment's (an error object, kind config), not a programming error", function()
    assert.are.equal("error: config no_api_key: no API key: pass api_key or set DASHSCOPE_API_KEY, or another "
      .. "provider's (OPENAI_API_KEY, GROQ_API_KEY, ...: the provider follows from it)", in_env({}))
    assert.matches("^error: config no_api_key: no API key", in_env({}, '{ api_key = "" }'))
  end)

  it("takes the CA from SSL_CERT_FILE, CURL_CA_BUNDLE and SSL_CERT_DIR when not given", function()
    assert.matches("|/a.pem|/certs$", in_env({ DASHSCOPE_API_KEY = "k", SSL_CERT_FILE = "/a.pem", CURL_CA_BUNDLE = "/b.pem",
                                              SSL_CERT_DIR = "/certs" }))
    assert.matches("|/b.pem|nil$", in_env({ DASHSCOPE_API_KEY = "k", CURL_CA_BUNDLE = "/b.pem" }))
    assert.matches("|/c.pem|/d$", in_env({ DASHSCOPE_API_KEY = "k", SSL_CERT_FILE = "/a.pem" },
                                          '{ cainfo = "/c.pem", capath = "/d" }'))
  end)
end)

describe("config: headers", function()
  it("adds extra headers, as a map or as lines, sorted after the fixed ones", function()
    local _, secrets = assert(config.new(opts({ headers = { ["X-Trace"] = "t1", "X-Team: core", ["X-N"] = 3 } })))
    assert.are.same({ "Authorization: Bearer sk-test", "Accept: application/json", "User-Agent: lbatch/" .. version,
                      "X-N: 3", "X-Team: core", "X-Trace: t1" }, secrets.headers)
  end)

  it("refuses a value with CR, LF or NUL (another header smuggled in)", function()
    for _, v in ipairs({ "a\r\nX-Evil: 1", "a\nb", "a\rb", "a\0b" }) do
      local cfg, err = config.new(opts({ headers = { ["X-Trace"] = v } }))
      assert.is_nil(cfg)
      assert.are.equal("headers: the value of X-Trace holds a CR, LF or NUL", err)
      assert.is_nil(config.new(opts({ headers = { "X-Trace: " .. v } })))
    end
  end)

  it("refuses a name that is not a token, a line without a colon, a value that is not a string", function()
    assert.matches("is not a header name", select(2, config.new(opts({ headers = { ["X Trace"] = "v" } }))))
    assert.matches("is not a header name", select(2, config.new(opts({ headers = { ["X-Trace:"] = "v" } }))))
    assert.matches("is not a header name", select(2, config.new(opts({ headers = { "Bad Name: v" } }))))
    assert.matches('is not "Name: value"', select(2, config.new(opts({ headers = { "no colon" } }))), 1, true)
    assert.matches("must be a string", select(2, config.new(opts({ headers = { ["X-A"] = {} } }))))
    assert.are.equal("headers must be a table", select(2, config.new(opts({ headers = "X-A: b" }))))
  end)

  it("scrubs secret-looking headers' values and a proxy's credentials like the key", function()
    local _, secrets = assert(config.new(opts({ headers = { ["X-Api-Key"] = "hk", Cookie = "ck", ["X-Session"] = "sv",
                                                              ["X-Plain"] = "pv" },
                                                 proxy = "http://alice:pw0123@proxy.example:3128" })))
    local set = {}
    for _, s in ipairs(secrets.list) do set[s] = true end
    assert.are.same({ ["sk-test"] = true, ["alice:pw0123"] = true, hk = true, ck = true, sv = true }, set)
    local _, plain = assert(config.new(opts({ proxy = "http://proxy.example:3128" })))
    assert.are.same({ "sk-test" }, plain.list)
  end)

  it("config.headers: the same check on its own, nil and why when wrong", function()
    local list = {}
    assert.are.same({ "A: 1", "B: 2" }, config.headers({ B = "2", A = 1 }, list))
    assert.are.same({}, list)
    assert.are.same({}, config.headers(nil))
    local lines, err = config.headers({ A = "x\ny" })
    assert.is_nil(lines)
    assert.matches("CR, LF or NUL", err)
  end)
end)
