-- A key goes to its own provider only: the command and lbatch.new through a
-- real local forward proxy that records the host each request asks for
-- and connects nowhere (nothing leaves the machine), and the emulator
-- checking which key it was sent.
local H = require "helper"
local service = require "lbatch.impl.api.service"

-- a recording proxy: each request's first line and Authorization header
-- appended to the log, answered 403 and closed; it never connects onward
local PROXY = [[
local socket = require "socket"
local srv = assert(socket.bind("127.0.0.1", tonumber(arg[1])))
local f = assert(io.open(arg[2] .. ".ready", "w")) f:close()
while true do
  local c = srv:accept()
  if c then
    c:settimeout(5)
    local first, auth = nil, ""
    repeat
      local l = c:receive("*l")
      first = first or l
      local a = l and l:match("^[Aa]uthorization:%s*(.*)$")
      if a then auth = a end
    until not l or l == ""
    local log = assert(io.open(arg[2], "a"))
    log:write(tostring(first), " | ", auth, "\n")
    log:close()
    c:send("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    c:close()
  end
end
]]

local function recording_proxy(dir)
  local port, log = H.free_port(), dir .. "/proxy.log"
  local script = H.write(dir .. "/proxy.lua", PROXY)
  local pid = H.sh(("%s %s %d %s >%s/proxy.out 2>&1 & echo $!"):format(H.lua, H.q(script), port, H.q(log), dir))
    :match("%d+")
  local t0 = H.now()
  while not H.exists(log .. ".ready") do
    assert(H.now() - t0 < 30, "the recording proxy did not start: " .. tostring(H.read(dir .. "/proxy.out")))
    H.sleep(0.05)
  end
  return { url = "http://127.0.0.1:" .. port, log = function() return H.read(log) or "" end,
           stop = function() H.ok("kill " .. pid) end }
end

local function paths()
  local cdir = H.lua:find("luajit") and "jit" or "5.4"
  return ("LUA_PATH='%s/?.lua;%s/?/init.lua;;' LUA_CPATH='%s/build/%s/?.so;;'"):format(H.root, H.root, H.root, cdir)
end

-- a command in an environment holding only `vars` (no key of the caller's)
local function run(vars, cmd)
  local env = { "env -i", "PATH=" .. H.q(os.getenv("PATH")), "HOME=/tmp", paths() }
  for k, v in pairs(vars) do env[#env + 1] = H.q(k .. "=" .. v) end
  return H.sh(("%s %s %s; echo \"exit=$?\""):format(table.concat(env, " "), H.lua, cmd))
end

local function hosts(log)
  local t = {}
  for host in log:gmatch("CONNECT ([^%s]+)") do t[host] = true end
  return t
end

describe("a key goes to its own provider", function()
  local dir, proxy
  setup(function()
    dir = H.tmpdir()
    proxy = recording_proxy(dir)
  end)
  teardown(function()
    proxy.stop()
    H.rm_rf(dir)
  end)

  local function list(vars)
    local before = #proxy.log()
    vars.https_proxy = proxy.url
    local out = run(vars, ("%s/bin/lbatch list --limit 1 2>&1"):format(H.root))
    return out, hosts(proxy.log():sub(before + 1))
  end

  it("OPENAI_API_KEY alone: the command asks for api.openai.com, never DashScope's host", function()
    local out, seen = list({ OPENAI_API_KEY = "sk-oa-only" })
    assert.is_true(seen["api.openai.com:443"], out)
    for host in pairs(seen) do assert.is_nil(host:find("dashscope", 1, true), host) end
    assert.not_matches("exit=0", out)
    -- the failure names the provider and the host it tried, never the key
    assert.matches("provider openai, host api.openai.com", out, 1, true)
    assert.is_nil(out:find("sk-oa-only", 1, true))
  end)

  it("DASHSCOPE_API_KEY alone: DashScope's host only", function()
    local out, seen = list({ DASHSCOPE_API_KEY = "sk-ds-only" })
    local host = service.REGIONS.cn:match("//([^/]+)") .. ":443"
    assert.is_true(seen[host], out)
    assert.is_nil(seen["api.openai.com:443"])
    assert.matches("provider dashscope, host " .. host:match("^[^:]+"), out, 1, true)
  end)

  it("both keys and no provider: the default's host, and it says so once", function()
    local out, seen = list({ DASHSCOPE_API_KEY = "sk-ds", OPENAI_API_KEY = "sk-oa" })
    assert.is_true(seen[service.REGIONS.cn:match("//([^/]+)") .. ":443"], out)
    assert.is_nil(seen["api.openai.com:443"])
    local _, n = out:gsub("using dashscope with DASHSCOPE_API_KEY", "")
    assert.are.equal(1, n, out)
    -- --provider picks the other
    local before = #proxy.log()
    out = run({ DASHSCOPE_API_KEY = "sk-ds", OPENAI_API_KEY = "sk-oa", https_proxy = proxy.url },
              ("%s/bin/lbatch list --provider openai 2>&1"):format(H.root))
    seen = hosts(proxy.log():sub(before + 1))
    assert.are.same({ ["api.openai.com:443"] = true }, seen)
    assert.is_nil(out:find("using dashscope", 1, true))
  end)

  it("lbatch.new follows the same rule, and says so in config.warning, printing nothing", function()
    local script = H.write(dir .. "/new.lua", [[
      local lbatch = require "lbatch"
      local c = assert(lbatch.new({ max_retries = 0 }))
      local _, err = c:list({ limit = 1 })
      io.write(c.config.provider, "|", tostring(c.config.warning), "|", tostring(err), "\n")
      c:close()
    ]])
    local before = #proxy.log()
    local out = run({ OPENAI_API_KEY = "sk-oa", https_proxy = proxy.url }, H.q(script) .. " 2>&1")
    assert.are.same({ ["api.openai.com:443"] = true }, hosts(proxy.log():sub(before + 1)))
    assert.matches("^openai|nil|lbatch: network", out)
    assert.matches("provider openai, host api.openai.com", out, 1, true)
    before = #proxy.log()
    out = run({ OPENAI_API_KEY = "sk-oa", DASHSCOPE_API_KEY = "sk-ds", https_proxy = proxy.url }, H.q(script))
    assert.is_true(hosts(proxy.log():sub(before + 1))[service.REGIONS.cn:match("//([^/]+)") .. ":443"])
    assert.matches("^dashscope|DASHSCOPE_API_KEY, OPENAI_API_KEY are set and no provider is named: using dashscope "
      .. "with DASHSCOPE_API_KEY", out)
  end)
end)

describe("a key with a base URL", function()
  local emu
  setup(function() emu = H.emulator({ speed = 200, rate_limits = false, api_key = "sk-ds-right" }) end)
  teardown(function() emu.stop() end)

  local function requests()
    local n = 0
    local routes = emu.stats().routes
    for _, v in pairs(type(routes) == "table" and routes or {}) do if type(v) == "number" then n = n + v end end
    return n
  end

  local function list(vars, flags)
    vars.LBATCH_BASE_URL = emu.base
    if emu.tls then vars.SSL_CERT_FILE = emu.tls end
    return run(vars, ("%s/bin/lbatch list --limit 1 %s 2>&1"):format(H.root, flags or ""))
  end

  it("another provider's key alone: refused, naming --provider, and nothing is sent", function()
    local before = requests()
    local out = list({ OPENAI_API_KEY = "sk-oa-wrong" })
    assert.matches("exit=[^0]", out)
    assert.matches("--provider", out, 1, true)
    assert.matches("OPENAI_API_KEY", out, 1, true)
    assert.is_nil(out:find("sk-oa-wrong", 1, true))
    assert.are.equal(before, requests())
  end)

  it("both keys: the default provider's own key is the one sent (the emulator takes only that one)", function()
    local out = list({ OPENAI_API_KEY = "sk-oa-wrong", DASHSCOPE_API_KEY = "sk-ds-right" })
    assert.matches("exit=0", out, 1, true)
    assert.matches("using dashscope with DASHSCOPE_API_KEY", out, 1, true)
    -- naming the other provider sends the other key: refused by this service
    out = list({ OPENAI_API_KEY = "sk-oa-wrong", DASHSCOPE_API_KEY = "sk-ds-right" }, "--provider openai")
    assert.matches("401", out, 1, true)
    assert.not_matches("exit=0", out)
  end)
end)
