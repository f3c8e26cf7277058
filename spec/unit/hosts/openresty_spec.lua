-- lbatch inside nginx with the Lua module: one worker serves the emulator
-- and an app that runs a whole batch flow through lbatch against it. The
-- flow can only finish if lbatch never blocks that worker.
local H = require "helper"
local cjson = require "cjson"

describe("lbatch in OpenResty", function()
  local emu
  setup(function()
    -- the example app's locations, and a probe of the worker's clients
    local conf = H.write(H.tmpdir() .. "/locations.conf", ("include %s/examples/openresty/locations.conf;\n"):format(H.root)
      .. [[location = /probe/clients { content_by_lua_block {
  local o, cjson = require "lbatch.openresty", require "cjson"
  local a = assert(o.client({ api_key = "k", base_url = "http://127.0.0.1:1/v1" }))
  local b = assert(o.client({ api_key = "k", base_url = "http://127.0.0.1:2/v1" }))
  local c = assert(o.client({ api_key = "k2", base_url = "http://127.0.0.1:1/v1" }))
  local a2 = assert(o.client({ api_key = "k", base_url = "http://127.0.0.1:1/v1" }))
  ngx.say(cjson.encode({ by_url = a ~= b, by_key = a ~= c, cached = a == a2, one_scheduler = o.scheduler() == o.scheduler()
    and a.scheduler == b.scheduler and a.scheduler == o.scheduler() }))
} }
]])
    emu = H.emulator({ speed = 200, rate_limits = false, include = conf })
  end)

  it("keeps one client per base_url, region and key, all on the worker's one scheduler", function()
    local status, res = H.json("GET", emu.url .. "/probe/clients", { key = false })
    assert.are.equal(200, status, cjson.encode(res))
    assert.are.same({ by_url = true, by_key = true, cached = true, one_scheduler = true }, res)
  end)
  teardown(function() emu.stop() end)

  it("runs a whole batch flow from content_by_lua in the same worker as the emulator", function()
    local status, res = H.json("GET", emu.url .. "/app/flow?n=5", { key = false })
    assert.are.equal(200, status, cjson.encode(res))
    assert.are.same({ "completed", 5 }, { res.status, res.lines })
  end)

  it("runs it from an ngx.timer too", function()
    local status, res = H.json("GET", emu.url .. "/app/flow-in-timer?n=3", { key = false })
    assert.are.equal(200, status, cjson.encode(res))
    assert.are.same({ "completed", 3 }, { res.status, res.lines })
  end)

  it("keeps serving other requests while flows run", function()
    -- each flow's create held 5 s (the emulator sleeps without blocking):
    -- a flow that blocked the worker would hold every other answer as long
    H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/batches$", delay = 5, times = 3 } })
    local outs = {}
    for i = 1, 3 do
      outs[i] = os.tmpname()
      H.ok(("curl -s %s -o %s %s/app/flow?n=20 &"):format(emu.tls and ("--cacert " .. emu.tls) or "", outs[i], emu.url))
    end
    local function running()
      for i = 1, 3 do if (H.read(outs[i]) or "") ~= "" then return false end end
      return true
    end
    local worst, answered = 0, 0
    H.sleep(0.5)                                  -- (the flows' creates are out)
    while answered < 10 and running() do
      local t0 = H.now()
      assert.are.equal(200, (H.json("GET", emu.base .. "/files?limit=1")))
      worst = math.max(worst, H.now() - t0)
      if running() then answered = answered + 1 end
    end
    H.http("DELETE", emu.url .. "/_emulator/faults")
    assert.is_true(answered >= 3, ("%d answers while the flows ran"):format(answered))
    assert.is_true(worst < 4, "slowest answer " .. worst .. " s")
    for i = 1, 3 do
      local res
      for _ = 1, 300 do
        local text = H.read(outs[i])
        if text and text ~= "" then res = cjson.decode(text) break end
        H.sleep(0.05)
      end
      os.remove(outs[i])
      assert.is_table(res)
      assert.are.same({ "completed", 20 }, { res.status, res.lines })
    end
  end)
end)

describe("lbatch in OpenResty, told, not polling", function()
  local SECRET = "whsec_" .. require("lbatch.core").base64("the OpenResty example's webhook secret")
  local scheme = H.tls_ca and "https" or "http"

  -- n jobs waited on at a 30 s interval in the worker: done in seconds
  -- only if each notice delivered to /app/notify woke its wait there
  local function told(emu, dialect, n)
    local status, res = H.json("GET", ("%s/app/told?n=%d&dialect=%s"):format(emu.url, n, dialect), { key = false })
    assert.are.equal(200, status, cjson.encode(res))
    assert.are.equal(n, #res.statuses)
    for _, s in ipairs(res.statuses) do assert.are.equal("completed", s) end
    assert.is_true(res.seconds < 10, ("%.1f s: the waits were not woken"):format(res.seconds))
    assert.is_true(res.calls <= n + 1, ("%d status calls for %d jobs"):format(res.calls, n))
  end

  it("the emulator's signed webhooks wake the waits in the same worker", function()
    local emu = H.emulator({ speed = 100, rate_limits = false, dialect = "openai", webhook_secret = SECRET,
      webhook_url = scheme .. "://127.0.0.1:{port}/app/notify?dialect=openai",
      include = H.root .. "/examples/openresty/locations.conf" })
    local ok, err = pcall(told, emu, "openai", 4)
    -- a forged delivery is refused; what is not a POST too
    local forged = H.http("POST", emu.url .. "/app/notify?dialect=openai", { key = false, data = '{"type":"batch.completed"}',
      headers = { "webhook-id: wh_1", "webhook-timestamp: " .. os.time(), "webhook-signature: v1,AAAA" } })
    local get = H.http("GET", emu.url .. "/app/notify", { key = false })
    emu.stop()
    assert(ok, err)
    assert.are.same({ 400, 405 }, { tonumber(forged), tonumber(get) })
  end)

  it("DashScope's callbacks, to the URL each batch names, wake them too", function()
    local emu = H.emulator({ speed = 100, rate_limits = false,
      include = H.root .. "/examples/openresty/locations.conf" })
    local ok, err = pcall(told, emu, "dashscope", 4)
    emu.stop()
    assert(ok, err)
  end)
end)
