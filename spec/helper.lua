-- Shared by the specs: a real emulator (nginx) when a spec asks for one
-- with H.emulator(), a curl(1) client that does not depend on lbatch,
-- temp files and small waits. Requiring it starts nothing: the pure unit
-- specs run without nginx (spec/README.md).
local H = {}

H.root = os.getenv("LBATCH_ROOT") or "."
H.lua = os.getenv("LBATCH_LUA") or "lua5.4"

local ok_sys, system = pcall(require, "system")

function H.sleep(s)
  if ok_sys and system.sleep then system.sleep(s) else os.execute("sleep " .. s) end
end

function H.now()
  if ok_sys and system.gettime then return system.gettime() end
  return os.time()
end

-- Under `make asan` (and run-all's AddressSanitizer stage) the sanitizer
-- runtime is preloaded into this process; the programs the specs start
-- (curl, nginx, node) run without it. The Lua programs they start (the
-- command, drivers, scripts: H.lua) load the sanitized core too, so they
-- get the runtime back, without leak checking (a program that ends with
-- os.exit leaves its state to the system: LeakSanitizer would call that a
-- leak and change its exit code).
-- The whole command line runs in a shell without it (a command may be
-- `cd dir && prog`, or a pipe: `env -u LD_PRELOAD` before it would miss all
-- but its first program).
local preload = os.getenv("LD_PRELOAD")
H.asan = preload ~= nil
-- (cheaper: LD_PRELOAD taken out of this process's environment, so that the
-- commands start without it and no `env -u` is needed: spec/tools/unpreload.c)
local unpreloaded = H.asan and preload:find("asan") and pcall(require, "lbatch_spec_unpreload")
local function clean(cmd)
  if not H.asan or unpreloaded then return cmd end
  return "env -u LD_PRELOAD sh -c '" .. cmd:gsub("'", "'\\''") .. "'"
end
if H.asan and preload:find("asan") then
  H.lua = ("env LD_PRELOAD=%s ASAN_OPTIONS=detect_leaks=0 %s"):format(preload, H.lua)
end

-- os.execute's result as a boolean on every Lua (5.1 returns a number)
function H.ok(cmd)
  local r = os.execute(clean(cmd))
  return r == true or r == 0
end

local function sh(cmd)
  local p = io.popen(clean(cmd))
  local out = p:read("*a")
  p:close()
  return out
end
H.sh = sh

-- this process's id
do
  local f = assert(io.open("/proc/self/stat"))
  H.pid = tonumber(f:read("*l"):match("^(%d+)"))
  f:close()
end

-- How many more files this process has open after fn() than before it, the
-- collector stopped meanwhile (a handle fn leaves open would otherwise be
-- closed when collected). Counted by another process, ls.
local function open_files()
  local p = assert(io.popen("ls /proc/" .. H.pid .. "/fd | wc -l"))
  local n = tonumber(p:read("*a"))
  p:close()
  return n
end
function H.files_left_open(fn)
  collectgarbage("stop")
  local before = open_files()
  local ok, err = pcall(fn)
  local after = open_files()
  collectgarbage("restart")
  if not ok then error(err, 0) end
  return after - before
end

-- LuaJIT's math.random starts from the same seed in every process: seed it,
-- or every run picks the same "random" emulator ports
math.randomseed(os.time() + H.pid * 7919)

-- Ports. spec/run-all runs several spec files at once, each in a slot of
-- its own with LBATCH_PORT_BASE=B: H.free_port picks in B..B+499 and the
-- servers below in B+500..B+2999 (spec/run-all gives the slots 2000,
-- 5000, ..., 29000). Unset (one spec run by hand): 10000-19999 and
-- 20000-32499. Every range is below the kernel's ephemeral range
-- (32768-60999 on Linux), where an outgoing connection may hold any port.
local port_base = tonumber(os.getenv("LBATCH_PORT_BASE") or "")
local function server_port()
  if port_base then return math.random(port_base + 500, port_base + 2999) end
  return math.random(20000, 32499)
end

-- A port for a listener a spec starts itself (a webhook receiver), which
-- must be known before the listener runs: apart from the servers' range
-- and not bound now by any socket on the machine (/proc/net/tcp and tcp6).
function H.free_port()
  local used = {}
  for _, table_ in ipairs({ "/proc/net/tcp", "/proc/net/tcp6" }) do
    local f = io.open(table_)
    if f then
      for line in f:lines() do
        local hex = line:match("^%s*%d+:%s+%x+:(%x+)%s")
        if hex then used[tonumber(hex, 16)] = true end
      end
      f:close()
    end
  end
  local lo, hi = 10000, 19999
  if port_base then lo, hi = port_base, port_base + 499 end
  for _ = 1, 1000 do
    local port = math.random(lo, hi)
    if not used[port] then return port end
  end
  error(("no free port in %d-%d"):format(lo, hi))
end

-- Temp files. spec/run-all gives each spec file a TMPDIR of its own and
-- removes it when the file has ended, whatever happened: the specs make
-- their temp files there (H.tmpdir, and os.tmpname, which on Lua 5.4 and
-- LuaJIT would name a file in /tmp whatever TMPDIR says).
H.tmp = os.getenv("TMPDIR")
if H.tmp == "" or not H.tmp then H.tmp = "/tmp" end
if H.tmp ~= "/tmp" then
  local made = 0
  function os.tmpname()   -- luacheck: ignore 122 (a spec process's own os.tmpname)
    for _ = 1, 100 do
      made = made + 1
      local name = ("%s/lua_%d_%d_%d"):format(H.tmp, H.pid, made, math.random(1e6))
      if not io.open(name, "rb") then
        local f = io.open(name, "wb")
        if f then f:close() return name end
      end
    end
    error("os.tmpname: cannot make a file in " .. H.tmp)
  end
end

-- (with LuaFileSystem, a dependency of busted, in this process: a mktemp or
-- an rm costs a fork and an exec, several ms of CPU here, and the suite
-- makes thousands)
local has_lfs, lfs = pcall(require, "lfs")

-- a new directory of this spec's own, under TMPDIR
function H.tmpdir()
  if has_lfs then
    for _ = 1, 100 do
      local path = ("%s/lbatch-spec.%06x%06x"):format(H.tmp, math.random(0, 0xffffff), math.random(0, 0xffffff))
      if lfs.mkdir(path) then return path end           -- (fails if it exists)
    end
  end
  return (sh("mktemp -d " .. H.q(H.tmp .. "/lbatch-spec.XXXXXX")):gsub("%s+$", ""))
end

-- rm -rf PATH: a symlink is removed, never followed
function H.rm_rf(path)
  if not has_lfs then return H.rm_rf(path) end
  local function rm(p)
    local attr = lfs.symlinkattributes(p)
    if not attr then return end
    if attr.mode == "directory" then
      for name in lfs.dir(p) do
        if name ~= "." and name ~= ".." then rm(p .. "/" .. name) end
      end
      lfs.rmdir(p)
    else
      os.remove(p)
    end
  end
  rm(path)
  return lfs.symlinkattributes(path) == nil or H.rm_rf(path)
end

-- A copy of the checkout in a temp dir (its files, without .git, node
-- modules or builds but the 5.4 and LuaJIT cores, timestamps kept so that
-- make sees those up to date), for a spec that runs make targets which
-- write into the tree (`make install` compiles in it, `make docs` writes
-- docs/): the same spec runs in several stages at once (spec/run-all).
function H.scratch_checkout()
  local dir = H.tmpdir()
  assert(H.ok(("tar -C %s --exclude=./.git --exclude=node_modules --exclude=./build --exclude=./docs -cf - . | tar -C %s -xf -"
    .. " && mkdir -p %s/build && (tar -C %s -cf - build/5.4 build/jit 2>/dev/null | tar -C %s -xf -)")
    :format(H.q(H.root), H.q(dir), H.q(dir), H.q(H.root), H.q(dir))), "cannot copy the checkout")
  return dir
end

function H.mkdir(path) assert(H.ok("mkdir -p " .. H.q(path))) return path end

function H.write(path, text)
  local f = assert(io.open(path, "wb"))
  f:write(text)
  f:close()
  return path
end

function H.read(path)
  local f = io.open(path, "rb")
  if not f then return nil end
  local s = f:read("*a")
  f:close()
  return s
end

function H.exists(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

-- Whether process PID still runs. A zombie does not: the servers are
-- setsid'd orphans, and PID 1 here may reap them a second or two late
-- (kill -0 would keep answering yes until then).
function H.running(pid)
  local f = io.open("/proc/" .. pid .. "/stat")
  if not f then return false end
  local state = (f:read("*a") or ""):match(".*%) (%a)")
  f:close()
  return state ~= nil and state ~= "Z"
end

-- Every server a spec starts (H.emulator, H.hostile, H.squid) is stopped
-- when its spec file ends, whatever happened to it: a test that fails
-- before its own stop(), a setup that errs (busted's "file end" event;
-- spec/run-all also stops what a spec file's job left, and names it).
local running = {}
local function started(srv)
  running[srv] = true
  local stop = srv.stop
  function srv.stop(...)
    running[srv] = nil
    return stop(...)
  end
  return srv
end
do
  local ok, busted = pcall(require, "busted")
  if ok and type(busted) == "table" and busted.subscribe then
    busted.subscribe({ "file", "end" }, function()
      for srv in pairs(running) do pcall(srv.stop) end
      return nil, true
    end)
  end
end

-- Start a server script on a free port: SCRIPT --port N ARGS... must
-- print "listening on" once it accepts requests. Returns {pid, port, url,
-- log, alive(), stop()}. opts.cpu: taskset's CPU list; opts.data: a dir
-- it keeps (otherwise the one made here is removed by stop()).
local function serve(script, args, opts, data)
  for _ = 1, 20 do
    local port = server_port()
    local log = os.tmpname()
    local pin = opts.cpu and ("taskset -c " .. opts.cpu .. " ") or ""
    -- ({port} in an argument: this port, for a URL back to the server itself)
    local argv = table.concat(args, " "):gsub("{port}", tostring(port))
    local cmd = ("setsid %s%s --port %d %s >%s 2>&1 & echo $!"):format(pin, script, port, argv, log)
    local pid = sh(cmd):match("%d+")
    local deadline = H.now() + 60                 -- (a busy machine: it starts in well under a second alone)
    while H.now() < deadline do
      local out = H.read(log) or ""
      if out:find("listening on", 1, true) then
        local url = (out:match("listening on (https?://[%d.:]+)")) or ("http://127.0.0.1:" .. port)
        local srv = { pid = pid, port = port, url = url, base = url .. "/v1", data = data, log = log }
        function srv.alive() return H.running(pid) end
        function srv.stop()
          H.ok("kill -TERM " .. pid .. " 2>/dev/null")
          for _ = 1, 100 do
            if not srv.alive() then break end
            H.sleep(0.05)
          end
          os.remove(log)
          if data and not opts.data then H.rm_rf(data) end   -- a data dir made here
        end
        return started(srv)
      end
      if out:find("emerg", 1, true) then break end  -- port taken: try another
      if not H.running(pid) then break end   -- it ended: try again
      H.sleep(0.05)
    end
    H.ok("kill -TERM " .. pid .. " 2>/dev/null")
  end
  error(script .. " did not start")
end

-- The suite's second pass runs over HTTPS and HTTP/2: spec/run-all makes a
-- throwaway CA, exports LBATCH_SPEC_TLS_CA (its directory) and
-- SSL_CERT_FILE (which lbatch, and the commands the specs start, trust),
-- and every emulator then serves TLS with a certificate from that CA.
H.tls_ca = os.getenv("LBATCH_SPEC_TLS_CA")
if H.tls_ca == "" then H.tls_ca = nil end

-- Start emulator/run on a free port. opts: speed, dialect, rate_limits,
-- api_key, data, include, webhook_url and webhook_secret, cpu (taskset's CPU list), tls (default: the
-- pass's), keepalive_requests. Returns an object with url, base (…/v1),
-- port, data, stop(), stats().
local has_nginx
function H.emulator(opts)
  opts = opts or {}
  if has_nginx == nil then has_nginx = H.ok("sh -c 'command -v nginx' >/dev/null 2>&1") end   -- (under ASan H.ok runs env: a program, not a builtin)
  if not has_nginx then error("H.emulator: nginx is not on PATH (this spec needs the emulator: spec/README.md)", 2) end
  local data = opts.data or H.tmpdir()
  local args = { "--data", data, "--speed", opts.speed or 200, "--dialect", opts.dialect or "dashscope" }
  local tls = opts.tls
  if tls == nil then tls = H.tls_ca ~= nil end
  if tls then
    args[#args + 1] = "--tls"
    if H.tls_ca then args[#args + 1] = "--ca" args[#args + 1] = H.tls_ca end
  end
  if opts.region then args[#args + 1] = "--region" args[#args + 1] = opts.region end
  if opts.limits then args[#args + 1] = "--limits" args[#args + 1] = opts.limits end
  if opts.keepalive_requests then
    args[#args + 1] = "--keepalive-requests"
    args[#args + 1] = opts.keepalive_requests
  end
  if opts.rate_limits ~= nil then
    args[#args + 1] = "--rate-limits"
    args[#args + 1] = opts.rate_limits and "on" or "off"
  end
  if opts.api_key then args[#args + 1] = "--api-key" args[#args + 1] = opts.api_key end
  if opts.include then args[#args + 1] = "--include" args[#args + 1] = opts.include end
  if opts.webhook_url then            -- OpenAI-dialect webhooks (emulator/lua/emu/webhooks.lua)
    for _, a in ipairs({ "--webhook-url", opts.webhook_url, "--webhook-secret", opts.webhook_secret }) do
      args[#args + 1] = a
    end
  end
  local emu = serve(H.root .. "/emulator/run", args, opts, data)
  emu.tls = tls and (data .. "/ca.pem") or nil
  function emu.stats()
    local _, s = H.json("GET", emu.url .. "/_emulator/stats", { cacert = emu.tls })
    return s
  end
  -- spec/run-all sums up the protocols the emulators saw (LBATCH_SPEC_STATS)
  local stop, record = emu.stop, os.getenv("LBATCH_SPEC_STATS")
  function emu.stop()
    if record and record ~= "" and emu.alive() then
      local s = emu.stats()
      local p = type(s) == "table" and type(s.protocols) == "table" and s.protocols or {}
      local f = io.open(record, "ab")
      if f then
        f:write(("%d %d %d\n"):format(p["HTTP/2.0"] or 0, p["HTTP/1.1"] or 0, tonumber(s.connections) or 0))
        f:close()
      end
    end
    return stop()
  end
  return emu
end

-- Start a real forward proxy (Debian's squid) on a free port, with a
-- throwaway configuration: CONNECT to any port on this machine; with
-- opts.user and opts.password, basic authentication. Returns {url, port,
-- log() (its access log), stop()}.
function H.squid(opts)
  opts = opts or {}
  local dir = H.tmpdir()
  H.ok("chmod 777 " .. dir)              -- squid writes as its own user
  local last_log = ""
  for _ = 1, 10 do
    local port = server_port()
    local auth = ""
    if opts.user then
      local hash = sh("openssl passwd -1 " .. H.q(opts.password)):gsub("%s+$", "")
      H.write(dir .. "/passwd", opts.user .. ":" .. hash .. "\n")
      H.ok("chmod 644 " .. dir .. "/passwd")
      auth = ("auth_param basic program /usr/lib/squid/basic_ncsa_auth %s/passwd\n"):format(dir)
        .. "auth_param basic realm lbatch\nacl authed proxy_auth REQUIRED\nhttp_access allow authed\n"
    end
    H.write(dir .. "/squid.conf", table.concat({
      "http_port 127.0.0.1:" .. port, "pid_filename " .. dir .. "/squid.pid",
      "cache_log " .. dir .. "/cache.log", "access_log stdio:" .. dir .. "/access.log",
      "cache deny all", "cache_mem 8 MB", "coredump_dir " .. dir, "shutdown_lifetime 0 seconds",
      "pinger_enable off", auth, opts.user and "" or "http_access allow localhost", "http_access deny all", "",
    }, "\n"))
    -- (-n: a service name of its own, so that squids started at once by
    -- specs running side by side share no shared-memory segment)
    local pid = sh(("setsid squid -N -n lbatch%d -f %s/squid.conf >%s/out 2>&1 & echo $!"):format(port, dir, dir)):match("%d+")
    local deadline = H.now() + 60
    while H.now() < deadline do
      if (H.read(dir .. "/cache.log") or ""):find("Accepting HTTP Socket connections", 1, true) then
        local proxy = { port = port, url = "http://127.0.0.1:" .. port, dir = dir }
        -- squid writes its access log a moment after a request ends:
        -- the log once it has stopped growing (0.3 s), at most 3 s
        function proxy.log()
          local last, still = nil, 0
          for _ = 1, 60 do
            local now = H.read(dir .. "/access.log") or ""
            if now == last and now ~= "" then
              still = still + 1
              if still >= 6 then return now end
            else still = 0 end
            last = now
            H.sleep(0.05)
          end
          return last or ""
        end
        function proxy.stop()
          H.ok("kill -TERM " .. pid .. " 2>/dev/null")
          for _ = 1, 100 do
            if not H.running(pid) then break end
            H.sleep(0.05)
          end
          H.rm_rf(dir)
        end
        return started(proxy)
      end
      if (H.read(dir .. "/cache.log") or ""):find("FATAL", 1, true) then break end
      if not H.running(pid) then break end   -- it ended (its words in out): try again
      H.sleep(0.05)
    end
    -- (port taken, most likely): the next try starts from a clean log, or
    -- it would read this one's FATAL and give up at once
    H.ok("kill -TERM " .. pid .. " 2>/dev/null")
    for _ = 1, 40 do
      if not H.running(pid) then break end
      H.sleep(0.05)
    end
    last_log = (H.read(dir .. "/cache.log") or "") .. (H.read(dir .. "/out") or "")
    os.remove(dir .. "/cache.log")
    os.remove(dir .. "/squid.pid")
  end
  error("squid did not start: " .. last_log)
end

-- Start the hostile server (spec/hostile). srv.at(name) is the base URL
-- of a scenario; srv.stats() its request counts; srv.reset() clears them.
function H.hostile()
  local srv = serve(H.root .. "/spec/hostile/run", {}, {})
  function srv.at(name) return srv.url .. "/s/" .. name .. "/v1" end
  function srv.stats()
    local _, s = H.json("GET", srv.url .. "/_hostile/stats")
    return s
  end
  function srv.reset() H.http("DELETE", srv.url .. "/_hostile/stats") end
  return srv
end

local function q(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end
H.q = q

-- The servers' own control paths (the emulator's /_emulator/..., the hostile
-- kit's /_hostile/...: stats, faults, modes, the clock) are how a spec steers
-- and reads them, not what it tests. Over plain HTTP they are asked in this
-- process (LuaSocket), not through a curl process each: a curl costs about
-- 40 ms of CPU here, and a pass of the suite asks over a thousand of them.
-- Anything else, HTTPS, or a failure to connect goes through curl, as it is
-- curl's behaviour (its exit code, a cut body) that the specs assert.
-- (LuaSocket loaded at the first such call, not with the helper: a spec
-- that never asks one does not pay for it)
local has_socket, socket_http
local function control_http(method, url, o)
  if o.form or o.out or not url:find("^http://[^/]+/_[%a]+/") then return nil end
  if has_socket == nil then has_socket, socket_http = pcall(require, "socket.http") end
  if not has_socket then return nil end
  local cjson = require "cjson"
  local ltn12 = require "ltn12"
  local body = o.data
  local headers = {}
  if o.key ~= false then headers.authorization = "Bearer " .. (o.key or "test-key") end
  if o.json then
    body = type(o.json) == "string" and o.json or cjson.encode(o.json)
    headers["content-type"] = "application/json"
  end
  for _, h in ipairs(o.headers or {}) do
    local k, v = h:match("^([^:]+):%s*(.*)$")
    headers[k:lower()] = v
  end
  if body then headers["content-length"] = tostring(#body) end
  local chunks = {}
  socket_http.TIMEOUT = 30
  local ok, status, got = socket_http.request({ url = url, method = method, headers = headers,
    source = body and ltn12.source.string(body) or nil, sink = ltn12.sink.table(chunks) })
  if not ok or type(status) ~= "number" then return nil end
  return status, table.concat(chunks), got or {}, 0
end

-- curl(1): H.http(method, url, {key=, json=, data=, form={...}, headers={...}, out=})
-- returns status, body, headers (lowercased names), curl exit code
function H.http(method, url, o)
  o = o or {}
  local c_status, c_text, c_headers, c_rc = control_http(method, url, o)
  if c_status then return c_status, c_text, c_headers, c_rc end
  local hdr, body = os.tmpname(), o.out or os.tmpname()
  local cmd = { "curl -s -S --max-time 30 -X", method, "-D", hdr, "-o", body, "-w '%{http_code}'" }
  if o.key ~= false then cmd[#cmd + 1] = "-H " .. q("Authorization: Bearer " .. (o.key or "test-key")) end
  local ca = o.cacert or (url:find("^https://") and (H.tls_ca and H.tls_ca .. "/ca.pem"))
  if ca then cmd[#cmd + 1] = "--cacert " .. q(ca) end
  for _, h in ipairs(o.headers or {}) do cmd[#cmd + 1] = "-H " .. q(h) end
  if o.json then
    local cjson = require "cjson"
    cmd[#cmd + 1] = "-H 'Content-Type: application/json' --data-binary " .. q(type(o.json) == "string" and o.json or cjson.encode(o.json))
  end
  if o.data then cmd[#cmd + 1] = "--data-binary " .. q(o.data) end
  for _, f in ipairs(o.form or {}) do cmd[#cmd + 1] = "-F " .. q(f) end
  cmd[#cmd + 1] = q(url)
  local p = io.popen(clean(table.concat(cmd, " ") .. " 2>/dev/null; echo \" $?\""))
  local out = p:read("*a")
  p:close()
  local status, rc = out:match("(%d+)%s+(%d+)%s*$")
  local headers = {}
  for k, v in (H.read(hdr) or ""):gmatch("([%w%-]+):%s*([^\r\n]*)") do headers[k:lower()] = v end
  local text = o.out and nil or H.read(body)
  os.remove(hdr)
  if not o.out then os.remove(body) end
  return tonumber(status), text, headers, tonumber(rc)
end

-- JSON helpers for the emulator specs
function H.json(method, url, o)
  local cjson = require "cjson"
  local status, body, headers, rc = H.http(method, url, o)
  local ok, obj = pcall(cjson.decode, body or "")
  return status, ok and obj or body, headers, rc
end

-- a decoded JSON value's type: "null", "integer" or "number" (lua-cjson
-- decodes both as floats on 5.4), "empty" ({} and [] alike), "array",
-- "object", or Lua's type
function H.jtype(v)
  local cjson = require "cjson"
  if v == cjson.null then return "null" end
  local t = type(v)
  if t == "number" then return v == math.floor(v) and "integer" or "number" end
  if t == "table" then
    if next(v) == nil then return "empty" end
    return #v > 0 and "array" or "object"
  end
  return t
end

-- A JSONL file of n chat (or test-model) requests.
function H.requests(path, n, o)
  o = o or {}
  local cjson = require "cjson"
  local f = assert(io.open(path, "wb"))
  for i = 1, n do
    local line = o.line and o.line(i) or {
      custom_id = (o.prefix or "req-") .. i, method = "POST", url = o.url or "/v1/chat/ds-test",
      body = { model = o.model or "batch-test-model",
               messages = { { role = "user", content = (o.content and o.content(i)) or ("question " .. i) } } },
    }
    f:write(type(line) == "string" and line or cjson.encode(line), "\n")
  end
  f:close()
  return path
end

-- Upload with curl, create, and wait until the batch is final.
H.FINAL = { completed = true, failed = true, expired = true, cancelled = true }

-- Poll the emulator until batch `id` has status `want` (or any final
-- one) or `seconds` (20) pass; returns the last batch read.
function H.wait_status(emu, id, want, seconds)
  local deadline = H.now() + (seconds or 20)
  local b
  repeat
    local _
    _, b = H.json("GET", emu.base .. "/batches/" .. id)
    if type(b) == "table" and (b.status == want or H.FINAL[b.status]) then return b end
    H.sleep(0.025)
  until H.now() > deadline
  return b
end

function H.wait_final(emu, id, seconds) return H.wait_status(emu, id, nil, seconds) end


-- The command line of bin/lbatch ARGS (a shell string: quote with H.q) on
-- H.lua, as a user types it. opts.emu: against that emulator (the key k and
-- LBATCH_BASE_URL); opts.env: more VAR=VALUE words before it.
function H.lbatch_cmd(args, opts)
  opts = opts or {}
  local env = opts.emu and ("DASHSCOPE_API_KEY=k LBATCH_BASE_URL=" .. opts.emu.base .. " ") or ""
  if opts.env then env = env .. opts.env .. " " end
  return ("env %s%s %s/bin/lbatch %s"):format(env, H.lua, H.root, args)
end

-- Run bin/lbatch ARGS (H.lbatch_cmd's opts; opts.cwd: where) and wait for
-- it: its exit code, stdout and stderr.
function H.lbatch(args, opts)
  opts = opts or {}
  local err = os.tmpname()
  local cd = opts.cwd and ("cd " .. q(opts.cwd) .. " && ") or ""
  local out = sh(("%s%s 2>%s; echo \"exit=$?\""):format(cd, H.lbatch_cmd(args, opts), err))
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  local stderr = H.read(err) or ""
  os.remove(err)
  return code, (out:gsub("exit=%d+%s*$", "")), stderr
end

-- Wait for pred() to be true, checking every `step` seconds (0.05) for at
-- most `seconds` (30: a deadline only a hang reaches); returns its last value.
function H.await(pred, seconds, step)
  local deadline = H.now() + (seconds or 30)
  local v = pred()
  while not v and H.now() < deadline do
    H.sleep(step or 0.05)
    v = pred()
  end
  return v
end



-- What the emulator holds, not the requests it saw. A request cut off after
-- its headers (lbatch streams a body through a read callback, so a kill -9
-- can land between the two writes) is counted in the routes at dispatch and
-- makes nothing, and the next run rightly sends it again: a spec that counts
-- requests after a kill, a cancel or a dropped connection counts one too
-- many now and then. Returns {batches = {input file id = batches made from
-- it}, files = {name = input files (purpose batch) stored under it},
-- nbatches, nfiles}, every page read.
function H.made(emu)
  local cjson = require "cjson"
  local o = { cacert = emu.tls }
  local m = { batches = {}, files = {}, nbatches = 0, nfiles = 0 }
  local function list(page) return type(page) == "table" and type(page.data) == "table" and page.data or {} end
  local after
  repeat
    local _, page = H.json("GET", emu.base .. "/batches?limit=100" .. (after and ("&after=" .. after) or ""), o)
    for _, b in ipairs(list(page)) do
      m.batches[b.input_file_id] = (m.batches[b.input_file_id] or 0) + 1
      m.nbatches, after = m.nbatches + 1, b.id
    end
  until type(page) ~= "table" or page.has_more ~= true
  local _, fl = H.json("GET", emu.base .. "/files?purpose=batch&limit=10000", o)
  for _, f in ipairs(list(fl)) do
    if f.purpose == "batch" then
      m.files[f.filename] = (m.files[f.filename] or 0) + 1
      m.nfiles = m.nfiles + 1
    end
  end
  m.text = cjson.encode({ batches_by_input_file = m.batches, files_by_name = m.files })
  return m
end

-- Fails unless the emulator holds `nfiles` input files and `nbatches`
-- batches, no two files under one name and no two batches of one file (the
-- money kept: nothing uploaded or created twice); `why` is added to the
-- message. Returns H.made's table.
function H.made_once(emu, nfiles, nbatches, why)
  local assert = require "luassert"
  local m = H.made(emu)
  local msg = m.text .. (why and ("\n" .. why) or "")
  for name, n in pairs(m.files) do assert.are.equal(1, n, name .. " stored " .. n .. " times: " .. msg) end
  for id, n in pairs(m.batches) do assert.are.equal(1, n, id .. " has " .. n .. " batches: " .. msg) end
  assert.are.same({ nfiles, nbatches }, { m.nfiles, m.nbatches }, msg)
  return m
end

-- The emulator's requests by route whose body came whole (stats' routes
-- less its cut: a request cut off after its headers made nothing).
function H.whole(emu)
  local cjson = require "cjson"
  local _, s = H.json("GET", emu.url .. "/_emulator/stats", { cacert = emu.tls })
  local routes = s.routes ~= cjson.null and s.routes or {}
  local cut = type(s.cut) == "table" and s.cut or {}
  local t = {}
  for route, n in pairs(routes) do t[route] = n - (cut[route] or 0) end
  return t, cut
end

return H
