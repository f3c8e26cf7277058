-- DashScope's workspace domains (`workspace = ID` with its region): the key goes to that
-- host and no other, through a real local forward proxy that records the
-- host each request asks for and connects nowhere (nothing leaves the
-- machine); an ID that would name another host, or no DashScope key,
-- sends nothing.
local H = require "helper"

-- each request's first line appended to the log, answered 403 and closed
local PROXY = [[
local socket = require "socket"
local srv = assert(socket.bind("127.0.0.1", tonumber(arg[1])))
local f = assert(io.open(arg[2] .. ".ready", "w")) f:close()
while true do
  local c = srv:accept()
  if c then
    c:settimeout(5)
    local first
    repeat local l = c:receive("*l") first = first or l until not l or l == ""
    local log = assert(io.open(arg[2], "a"))
    log:write(tostring(first), "\n")
    log:close()
    c:send("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    c:close()
  end
end
]]

-- a script run with only `vars` in its environment: lbatch.new(opts), one list call
local SCRIPT = [[
local lbatch = require "lbatch"
local opts = assert(load("return " .. arg[1]))()
local c, err = lbatch.new(opts)
if not c then io.write("new: ", tostring(err), "\n") return end
local _, lerr = c:list({ limit = 1 })
io.write(c.config.base_url, "|", tostring(lerr), "\n")
c:close()
]]

describe("workspace = ID: the key goes to the workspace's host only", function()
  local dir, port, log, pid, script
  setup(function()
    dir = H.tmpdir()
    port, log = H.free_port(), dir .. "/proxy.log"
    local p = H.write(dir .. "/proxy.lua", PROXY)
    pid = H.sh(("%s %s %d %s >%s/proxy.out 2>&1 & echo $!"):format(H.lua, H.q(p), port, H.q(log), dir)):match("%d+")
    assert(H.await(function() return H.exists(log .. ".ready") end, 30), "the recording proxy did not start")
    script = H.write(dir .. "/new.lua", SCRIPT)
  end)
  teardown(function()
    H.ok("kill " .. pid)
    H.rm_rf(dir)
  end)

  local function run(vars, opts)
    local before = #(H.read(log) or "")
    local cdir = H.lua:find("luajit") and "jit" or "5.4"
    local env = { "env -i", "PATH=" .. H.q(os.getenv("PATH")), "HOME=/tmp",
                  ("LUA_PATH='%s/?.lua;%s/?/init.lua;;' LUA_CPATH='%s/build/%s/?.so;;'"):format(H.root, H.root, H.root, cdir),
                  "https_proxy=" .. H.q("http://127.0.0.1:" .. port) }
    for k, v in pairs(vars) do env[#env + 1] = H.q(k .. "=" .. v) end
    local out = H.sh(("%s %s %s %s 2>&1"):format(table.concat(env, " "), H.lua, H.q(script), H.q(opts)))
    local seen = {}
    for host in (H.read(log) or ""):sub(before + 1):gmatch("CONNECT ([^%s]+)") do seen[#seen + 1] = host end
    return out, seen
  end

  it("DASHSCOPE_API_KEY and workspace: the workspace's domain in its region alone, never dashscope-intl's", function()
    local out, seen = run({ DASHSCOPE_API_KEY = "sk-ds-ws" }, '{ workspace = "ws-7f3a", region = "intl", max_retries = 0 }')
    assert.are.same({ "ws-7f3a.ap-southeast-1.maas.aliyuncs.com:443" }, seen, out)
    assert.matches("^https://ws%-7f3a%.ap%-southeast%-1%.maas%.aliyuncs%.com/compatible%-mode/v1|", out)
    assert.is_nil(out:find("sk-ds-ws", 1, true))
    out, seen = run({ DASHSCOPE_API_KEY = "sk-ds-ws" }, '{ workspace = "ws-7f3a", region = "cn", max_retries = 0 }')
    assert.are.same({ "ws-7f3a.cn-beijing.maas.aliyuncs.com:443" }, seen, out)
    -- no region: refused, for the ID does not say which of the two domains is its
    out, seen = run({ DASHSCOPE_API_KEY = "sk-ds-ws" }, '{ workspace = "ws-7f3a" }')
    assert.are.same({}, seen, out)
    assert.matches("workspace needs region", out, 1, true)
  end)

  it("only another provider's key: no key for the workspace, nothing sent", function()
    local out, seen = run({ OPENAI_API_KEY = "sk-oa" }, '{ workspace = "ws-7f3a", region = "intl", max_retries = 0 }')
    assert.are.same({}, seen, out)
    assert.matches("no API key: pass api_key or set DASHSCOPE_API_KEY", out, 1, true)
    assert.is_nil(out:find("sk-oa", 1, true))
  end)

  it("an ID that names another host: refused at lbatch.new, nothing sent", function()
    for _, id in ipairs({ "evil.example", "x@evil.example", "ws/../../evil" }) do
      local out, seen = run({ DASHSCOPE_API_KEY = "sk-ds" }, ("{ workspace = %q, region = 'intl' }"):format(id))
      assert.are.same({}, seen, id .. ": " .. out)
      assert.matches("is not a workspace ID", out, 1, true)
    end
  end)
end)
