-- The real wire: HTTPS and HTTP/2 as the service speaks them, certificate
-- options, what max_connections bounds, create's no-duplicate guarantee on
-- shared HTTP/2 connections through GOAWAYs and dropped streams, and a real
-- forward proxy (squid) on loopback.
local H = require "helper"
local lbatch = require "lbatch"
local cjson = require "cjson"

local function chat_file(dir, name, n)
  return H.requests(dir .. "/" .. name, n, { url = "/v1/chat/completions", model = "qwen-plus" })
end

local function routes(emu) return emu.stats().routes or {} end

describe("TLS", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false, tls = true })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  it("trusts the CA named by cainfo, by capath, or by SSL_CERT_FILE / CURL_CA_BUNDLE", function()
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls })
    assert.is_truthy(c:list_batches())
    c:close()
    local hashed = H.tmpdir()
    H.ok(("cp %s %s/ca.pem && openssl rehash %s 2>/dev/null"):format(emu.tls, hashed, hashed))
    local script = H.write(dir .. "/capath.lua", [[
      local c = require("lbatch").new({ api_key = "k", base_url = arg[1], capath = arg[2] })
      print(assert(c:list_batches()).object)
    ]])
    local out = H.sh(("env -u SSL_CERT_FILE -u CURL_CA_BUNDLE %s %s %s %s 2>&1"):format(H.lua, script, emu.base, hashed))
    assert.matches("^list", out)
    for _, var in ipairs({ "SSL_CERT_FILE", "CURL_CA_BUNDLE" }) do
      out = H.sh(("env -u SSL_CERT_FILE -u CURL_CA_BUNDLE %s=%s DASHSCOPE_API_KEY=k %s %s/bin/lbatch list --base-url %s 2>&1; echo exit=$?")
        :format(var, emu.tls, H.lua, H.root, emu.base))
      assert.matches("exit=0", out, 1, true)
    end
  end)

  it("a certificate it cannot verify is a network error that says so, and is not retried", function()
    local other = H.tmpdir()
    H.ok(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=other "
      .. "-keyout %s/k.pem -out %s/ca.pem 2>/dev/null"):format(other, other))
    local before = emu.stats().connections
    -- 6 retries would back off 17 s at the least: the bound below tells a retry from a loaded machine
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = other .. "/ca.pem", max_retries = 6 })
    local t0 = H.now()
    local v, err = c:list_batches()
    c:close()
    assert.is_nil(v)
    assert.are.same({ "network", "tls_certificate", false }, { err.kind, err.code, err.retryable })
    assert.matches("certificate", err.message)
    assert.is_true(H.now() - t0 < 10, "it was retried")
    assert.are.equal(before, emu.stats().connections)      -- no request reached the service
  end)

  it("multiplexes many transfers on few HTTP/2 connections", function()
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls, max_connections = 2 })
    local f = assert(c:upload(chat_file(dir, "mux.jsonl", 2)))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    local s0 = emu.stats()
    local tasks = {}
    for i = 1, 200 do tasks[i] = c:spawn(function() return assert(c:retrieve(b.id)).id end) end
    local t0 = H.now()
    assert(c:run())
    local took = H.now() - t0
    for _, t in ipairs(tasks) do assert.are.equal(b.id, (t:join())) end
    local s1 = emu.stats()
    local h2 = (s1.protocols["HTTP/2.0"] or 0) - ((s0.protocols or {})["HTTP/2.0"] or 0)
    assert.is_true(h2 >= 200, "requests over HTTP/2: " .. h2)
    assert.is_true(s1.connections - s0.connections <= 2, "new connections: " .. (s1.connections - s0.connections))
    assert.is_true(took < 30, ("200 retrieves took %.2f s"):format(took))   -- a hang, not a loaded machine
    c:close()
  end)

  it("creates on a shared connection (no handshake each), and none twice when the answer is lost", function()
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls })
    local f = assert(c:upload(chat_file(dir, "create.jsonl", 2)))
    local s0 = emu.stats()
    for i = 1, 10 do
      assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions", metadata = { n = tostring(i) } }))
    end
    assert.is_true(emu.stats().connections - s0.connections <= 1, "a connection per create")
    -- the service makes the batch, then the stream (or connection) is dropped
    local before = routes(emu)["POST /batches"]
    H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/batches$", mode = "close" } })
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions", metadata = { n = "lost" } }))
    assert.are.equal(before + 1, routes(emu)["POST /batches"])
    local n = 0
    for x in c:each_batch({ input_file_ids = { f.id } }) do
      if x.metadata and x.metadata.n == "lost" then n = n + 1 assert.are.equal(b.id, x.id) end
    end
    assert.are.equal(1, n)
    c:close()
  end)

  it("loses and duplicates nothing when the server sends GOAWAY every 7 requests (100 creates at once)", function()
    local goaway = H.emulator({ speed = 200, rate_limits = false, tls = true, keepalive_requests = 7 })
    local c = lbatch.new({ api_key = "k", base_url = goaway.base, cainfo = goaway.tls, max_retries = 4 })
    local f = assert(c:upload(chat_file(dir, "goaway.jsonl", 2)))
    for i = 1, 100 do
      c:spawn(function()
        return assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions", metadata = { n = tostring(i) } }))
      end)
    end
    assert(c:run())
    local seen = {}
    for x, err in c:each_batch({ input_file_ids = { f.id }, limit = 100 }) do
      assert.is_truthy(x, tostring(err))
      assert.is_nil(seen[x.metadata.n], "a second batch for " .. x.metadata.n)
      seen[x.metadata.n] = true
    end
    for i = 1, 100 do assert.is_true(seen[tostring(i)], "no batch for " .. i) end
    local st = goaway.stats()
    assert.is_true(st.connections >= 100 / 7, "connections: " .. st.connections)
    assert.are.equal(100, st.routes["POST /batches"])
    c:close()
    goaway.stop()
  end)
end)

describe("Together's upload over TLS", function()
  local KEY = "tls-key-0123456789abcdef"
  local emu, c, dir
  setup(function()
    emu = H.emulator({ dialect = "together", api_key = KEY, speed = 200, tls = true })
    c = assert(lbatch.new({ provider = "together", api_key = KEY, cainfo = emu.tls, fresh_window = 0,
      base_url = emu.url .. require("lbatch.impl.api.service").PROVIDERS.together.prefix }))
    dir = H.tmpdir()
  end)
  teardown(function()
    c:close()
    emu.stop()
  end)

  it("sends the bytes to the https URL the service presigned", function()
    local path = chat_file(dir, "tls.jsonl", 3)
    local f = assert(c:upload(path))
    assert.are.equal(1, routes(emu)["PUT presigned"])
    assert.are.equal(H.read(path), assert(c:content(f.id)))
  end)

  it("never sends them over plain http when the service is https: a downgraded Location is refused", function()
    local before = routes(emu)["PUT presigned"] or 0
    local plain = "http://127.0.0.1:" .. emu.url:match(":(%d+)") .. "/_presigned/file-x?signature=s"
    assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/faults", { cacert = emu.tls,
      json = { path = "^/v1/files$", method = "POST", headers = { Location = plain } } })))
    local f, err = c:upload(chat_file(dir, "down.jsonl", 1))
    assert.is_nil(f)
    assert.are.equal("invalid_upload_url", err.code)
    assert.are.equal(before, routes(emu)["PUT presigned"] or 0)
  end)
end)

describe("proxies", function()
  local emu
  setup(function() emu = H.emulator({ speed = 200, rate_limits = false, tls = true }) end)
  teardown(function() emu.stop() end)

  it("reach the TLS service through a real forward proxy (CONNECT): the proxy option and https_proxy", function()
    local proxy = H.squid()
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls, proxy = proxy.url })
    assert.is_truthy(c:list_batches())
    c:close()
    local host = emu.url:match("//(.*)$")
    assert.matches("CONNECT " .. host:gsub("%p", "%%%0"), proxy.log())
    local tunnels = select(2, proxy.log():gsub("CONNECT", ""))
    local out = H.sh(("env https_proxy=%s SSL_CERT_FILE=%s DASHSCOPE_API_KEY=k %s %s/bin/lbatch list --base-url %s 2>&1; echo exit=$?")
      :format(proxy.url, emu.tls, H.lua, H.root, emu.base))
    assert.matches("exit=0", out, 1, true)
    assert.are.equal(tunnels + 1, select(2, proxy.log():gsub("CONNECT", "")))
    -- no_proxy: straight there
    out = H.sh(("env https_proxy=%s no_proxy=127.0.0.1 SSL_CERT_FILE=%s DASHSCOPE_API_KEY=k %s %s/bin/lbatch list --base-url %s 2>&1; echo exit=$?")
      :format(proxy.url, emu.tls, H.lua, H.root, emu.base))
    assert.matches("exit=0", out, 1, true)
    assert.are.equal(tunnels + 1, select(2, proxy.log():gsub("CONNECT", "")))
    proxy.stop()
  end)

  it("a proxy that asks for authentication gives a clear error; its credentials in the URL work and never show", function()
    local proxy = H.squid({ user = "alice", password = "proxy-pass-0123456789" })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls, proxy = proxy.url, max_retries = 2 })
    local v, err = c:list_batches()
    c:close()
    assert.is_nil(v)
    assert.are.same({ "network", "proxy_auth_required", false }, { err.kind, err.code, err.retryable })
    local url = proxy.url:gsub("//", "//alice:proxy-pass-0123456789@")
    c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls, proxy = url })
    assert.is_truthy(c:list_batches())
    c:close()
    local wrong = proxy.url:gsub("//", "//alice:wrong-pass-9876543210@")
    c = lbatch.new({ api_key = "k", base_url = emu.base, cainfo = emu.tls, proxy = wrong, max_retries = 0 })
    v, err = c:list_batches()
    c:close()
    assert.is_nil(v)
    assert.is_nil(tostring(err):find("wrong-pa", 1, true))
    assert.are.equal("proxy_auth_required", err.code)
    proxy.stop()
  end)
end)

describe("HTTP/1.1", function()
  it("max_connections bounds the connections (and the transfers at once)", function()
    local emu = H.emulator({ speed = 200, rate_limits = false, tls = false })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, max_connections = 3 })
    for _ = 1, 60 do c:spawn(function() assert(c:list_batches({ limit = 1 })) end) end
    assert(c:run())
    local st = emu.stats()
    c:close()
    emu.stop()
    assert.is_true(st.connections <= 3, "connections: " .. st.connections)
    assert.are.equal(60, st.protocols["HTTP/1.1"])
    assert.is_nil(cjson.null ~= st.protocols["HTTP/2.0"] and st.protocols["HTTP/2.0"] or nil)
  end)
end)
