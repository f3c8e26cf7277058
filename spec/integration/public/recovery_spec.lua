-- Recovery that waits for the truth: a run stopped while uploads or
-- creates were in flight, on a server that makes them a moment later (the
-- emulator's slow_commit, which goes on after the client has gone), and
-- restarted at once, makes each file and batch once.
local H = require "helper"
local cjson = require "cjson"

local driver = H.root .. "/spec/fixtures/pipeline_driver.lua"

local function stats(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats")
  return s.routes ~= cjson.null and s.routes or {}
end

local function set_modes(emu, modes)
  local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = modes })
  assert.are.equal(200, status, cjson.encode(body))
end

-- the run's files (named RUN-K.jsonl) and batches on the server
local function made(emu)
  local _, files = H.json("GET", emu.base .. "/files?limit=100")
  local _, batches = H.json("GET", emu.base .. "/batches?limit=100")
  local function list(page) return type(page.data) == "table" and page.data or {} end
  local n = 0
  for _, f in ipairs(list(files)) do if tostring(f.filename):find("%-%d+%.jsonl$") then n = n + 1 end end
  return n, #list(batches)
end

-- the driver in the background: its pid; its output goes to out
local function start(emu, work, input, out, env)
  local cmd = ("%s %s %s %s %s %s > %s 2>&1 & echo $!"):format(env or "", H.lua, driver, emu.base, work, input, out)
  return assert(tonumber(H.sh("DRIVER_MAX_IN_FLIGHT=6 " .. cmd)))
end

-- wait until the server has received n requests of a route
local function wait_route(emu, route, n, seconds)
  local t0 = H.now()
  while (stats(emu)[route] or 0) < n do
    assert(H.now() - t0 < seconds, ("%s: %d of %d requests after %g s"):format(route, stats(emu)[route] or 0,
      n, seconds))
    H.sleep(0.05)
  end
end

-- gone: no longer running (a zombie waiting for its parent counts as gone)
local function wait_gone(pid)
  for _ = 1, 200 do
    local stat = H.read("/proc/" .. pid .. "/stat")
    if not stat or stat:match("^%d+ %b() (%a)") == "Z" then return end
    H.sleep(0.02)
  end
  error("process " .. pid .. " still running")
end

describe("recovery on a server that makes an upload or a create late", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function() emu.stop() end)

  it("slow_commit makes the object after the delay, even when the client has gone", function()
    set_modes(emu, { slow_commit = { seconds = 1 } })
    local path = H.write(dir .. "/a.jsonl", '{"custom_id":"1","method":"POST","url":"/v1/chat/completions",'
      .. '"body":{"model":"qwen-plus","messages":[]}}\n')
    local t0 = H.now()
    local status = H.http("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. path } })
    assert.are.equal(200, status)
    assert.is_true(H.now() - t0 >= 0.9)                     -- answered once made
    local rc = H.sh(("curl -s -o /dev/null --max-time 0.3 -H 'Authorization: Bearer k' -F purpose=batch "
      .. "-F file=@%s %s/files; echo $?"):format(H.q(path), emu.base))
    assert.matches("^28", rc)                           -- the client gave up
    local _, files = H.json("GET", emu.base .. "/files")
    assert.are.equal(1, #files.data)                        -- not made yet
    H.sleep(1)
    _, files = H.json("GET", emu.base .. "/files")
    assert.are.equal(2, #files.data)                        -- made all the same
    local _, m = H.json("GET", emu.url .. "/_emulator/stats")
    assert.are.equal(2, m.modes_hit.slow_commit)
  end)

  it("kill -9 during uploads, restarted at once: each shard uploaded and created once", function()
    local input = H.requests(dir .. "/in.jsonl", 24, { url = "/v1/chat/completions", model = "qwen-plus" })
    set_modes(emu, { slow_commit = { seconds = 3 } })
    local work = dir .. "/work"
    local pid = start(emu, work, input, dir .. "/out1")
    wait_route(emu, "POST /files", 6, 20)                    -- all six in flight, none made yet
    assert.are.equal(0, (made(emu)))
    assert(H.ok("kill -9 " .. pid))
    wait_gone(pid)
    local out = H.sh(("DRIVER_MAX_IN_FLIGHT=6 DRIVER_RECOVER_WINDOW=8 %s %s %s %s %s 2>&1")
      :format(H.lua, driver, emu.base, work, input))
    assert.matches("done 6 24 24", out)
    -- each shard's file and batch made once; none sent again that came whole
    -- (an upload the kill cut off after its headers made nothing, and is
    -- rightly sent again: stats' cut)
    H.made_once(emu, 6, 6, out)
    assert.are.equal(6, H.whole(emu)["POST /files"], cjson.encode(emu.stats()))
  end)

  it("SIGINT during creates, restarted at once: each shard created once", function()
    local input = H.requests(dir .. "/in.jsonl", 24, { url = "/v1/chat/completions", model = "qwen-plus" })
    set_modes(emu, { slow_commit = { seconds = 3 } })
    local work = dir .. "/work"
    local pid = start(emu, work, input, dir .. "/out1")
    wait_route(emu, "POST /batches", 6, 30)
    local _, b0 = made(emu)
    assert.are.equal(0, b0)
    assert(H.ok("kill -INT " .. pid))
    wait_gone(pid)
    local out = H.sh(("DRIVER_MAX_IN_FLIGHT=6 DRIVER_RECOVER_WINDOW=8 %s %s %s %s %s 2>&1")
      :format(H.lua, driver, emu.base, work, input))
    assert.matches("done 6 24 24", out)
    H.made_once(emu, 6, 6, out)
    assert.are.equal(6, H.whole(emu)["POST /batches"], cjson.encode(emu.stats()))
  end)

  it("finds a lost answer's object whatever the client's wall clock says (10 minutes fast or slow)", function()
    local lbatch = require "lbatch"
    local client = lbatch.new({ api_key = "k", base_url = emu.base })
    local path = H.requests(dir .. "/c.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })
    local time = os.time
    local ok, err = pcall(function()
      for _, skew in ipairs({ 600, -600 }) do
        os.time = function(t) return t and time(t) or time() + skew end    -- luacheck: ignore 122
        local before = stats(emu)
        -- made, then the connection dropped before the answer
        H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/files$", mode = "close" } })
        local f = assert(client:upload(path, { filename = "skew" .. skew .. ".jsonl" }))
        H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/batches$", mode = "close" } })
        local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                         metadata = { skew = tostring(skew) } }))
        local after = stats(emu)
        assert.are.same({ 1, 1 }, { after["POST /files"] - (before["POST /files"] or 0),
                                    after["POST /batches"] - (before["POST /batches"] or 0) })
        local page = assert(client:list_batches({ input_file_ids = { f.id } }))
        assert.are.same({ 1, b.id }, { #page.data, page.data[1].id })
      end
    end)
    os.time = time                                                         -- luacheck: ignore 122
    client:close()
    assert(ok, err)
  end)
end)

describe("the emulator's count of a request cut off after its headers", function()
  it("is in its routes and in its cut, and makes nothing; a request that came whole is not cut", function()
    local emu = H.emulator({ speed = 200, rate_limits = false, tls = false })   -- (a raw socket: plain HTTP)
    finally(function() emu.stop() end)
    local socket = require "socket"
    local c = assert(socket.connect("127.0.0.1", emu.port))
    -- what a client killed between its writes sends: the headers, part of the body
    assert(c:send("POST /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
      .. "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{\"input_file_id\":"))
    assert.is_truthy(H.await(function() return (stats(emu)["POST /batches"] or 0) == 1 end, 30))
    c:close()
    -- a whole create (of a file that is not there: refused, its body read all the same)
    local status = H.json("POST", emu.base .. "/batches", { json = { input_file_id = "file-none",
      endpoint = "/v1/chat/completions", completion_window = "24h" } })
    assert.are.equal(404, status)
    H.sleep(0.2)                        -- (the close seen by the emulator: nothing changes)
    local whole, cut = H.whole(emu)
    assert.are.same({ 2, 1, 1 }, { stats(emu)["POST /batches"], cut["POST /batches"], whole["POST /batches"] })
    assert.are.equal(0, H.made(emu).nbatches)
  end)
end)

describe("the kill -9 soak, short (make soak runs hundreds of kills)", function()
  it("a pipeline and a flow killed at random on a slow server, restarted at once or after a pause: "
     .. "every request answered once, nothing made twice", function()
    local kills = require "soak.kills"
    math.randomseed(H.pid)
    local fig, emu = kills.soak({ jobs = 2, flow_every = 2, kills = 3, slow = 0.5, pause = 0.5,
                                   items = 60 })
    emu.stop()
    assert.is_true(fig.kills >= 1 and fig.flows == 1, "killed " .. fig.kills .. " times")
    assert.is_true(fig.files >= 6 and fig.batches >= 6 and fig.answers >= 60)
  end)
end)
