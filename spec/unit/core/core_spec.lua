-- lbatch.core's pure parts, with no server: the failure kinds (core.FAIL
-- against what the C sources emit), idmap, the JSONL indexer (idmap:scan),
-- the system calls, the byte scanners, and a controller that never steps.
local core = require "lbatch.core"

local root = os.getenv("LBATCH_ROOT") or "."
local SPAN = 2 ^ 36                         -- idmap:scan's value: fileno * SPAN + byte offset

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  assert(core.mkdir(d))
  return d
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function sorted(t)
  table.sort(t)
  return t
end

describe("core.FAIL", function()
  -- the mapping http.lua held before it was the core's
  local expected = {
    io = { kind = "io", retryable = false },
    truncated = { kind = "network", code = "truncated", retryable = true },
    too_large = { kind = "decode", code = "response_too_large", retryable = false },
    stalled = { kind = "timeout", code = "stalled", retryable = true },
    resend = { kind = "network", code = "connection_lost", retryable = true },
    encoding = { kind = "decode", code = "unexpected_encoding", retryable = false },
    range = { kind = "network", code = "bad_range", retryable = true },
  }

  it("maps each of our own failures to its kind, code and retryable", function()
    assert.same(expected, core.FAIL)
    assert.is_nil(core.FAIL.io.code)
  end)

  it("names every failure the C sources emit, and they emit no kind as a string", function()
    local names = {}                        -- FAIL_X -> its name, from the one table in fail.c
    for id, name in slurp(root .. "/lbatch/core/fail.c"):gmatch("%[(FAIL_[%u_]+)%]%s*=%s*{%s*\"([%w_]+)\"") do
      names[id] = name
    end
    assert.is_true(next(names) ~= nil)
    local emitted = 0
    for _, file in ipairs({ "xfer.c", "multi.c" }) do
      local src = slurp(root .. "/lbatch/core/" .. file):gsub("void lb_xfer_fail%b()", "")  -- its definition
      for arg in src:gmatch("lb_xfer_fail%([^,]+,%s*([^,]+),") do
        assert.truthy(arg:match("^FAIL_[%u_]+$"), file .. " fails with " .. arg)
        assert.is_string(names[arg], arg .. " has no row in fail.c")
        assert.is_table(core.FAIL[names[arg]], names[arg] .. " is not in core.FAIL")
        emitted = emitted + 1
      end
    end
    assert.is_true(emitted >= 10)
    for id, name in pairs(names) do
      assert.is_table(core.FAIL[name], id)
    end
  end)

  it("is what the transport makes of a result's fail", function()
    local http = require "lbatch.impl.transport.http"
    for name, f in pairs(expected) do
      local v, err = http.answer({ fail = name, error = "it failed", status = 0, code = 0, headers = "" }, {})
      assert.is_nil(v)
      assert.same({ f.kind, f.code, f.retryable, "it failed" }, { err.kind, err.code, err.retryable, err.message })
    end
  end)
end)

describe("core.idmap", function()
  it("puts, gets, takes, counts and lists", function()
    local m = core.idmap()
    assert.equal(0, m:count())
    assert.is_true(m:put("a", 5))
    assert.is_false(m:put("a", 7))          -- the key was there: kept
    assert.equal(5, m:get("a"))
    assert.is_true(m:put("b"))              -- the value defaults to 1
    assert.equal(1, m:get("b"))
    assert.is_true(m:put("", 3))            -- the empty key is a key
    assert.equal(3, m:get(""))
    assert.is_true(m:has("a"))
    assert.is_false(m:has("c"))
    assert.is_nil(m:get("c"))
    assert.equal(3, m:count())
    assert.same({ "", "a", "b" }, sorted(m:keys()))
    assert.equal(5, m:take("a"))
    assert.is_nil(m:take("a"))
    assert.is_false(m:has("a"))
    assert.equal(2, m:count())
    assert.is_true(m:put("a", 9))           -- back in after a take
    assert.equal(9, m:get("a"))
  end)

  it("tells keys apart by every byte, NUL included", function()
    local m = core.idmap()
    assert.is_true(m:put("a\0b", 1))
    assert.is_true(m:put("a\0c", 2))
    assert.is_true(m:put("a", 3))
    assert.same({ 1, 2, 3 }, { m:get("a\0b"), m:get("a\0c"), m:get("a") })
  end)

  it("keeps exact values as large as a scan's", function()
    local m = core.idmap()
    local v = 1000 * SPAN + 123456789
    m:put("k", v)
    assert.equal(v, m:get("k"))
  end)

  it("holds many keys through growth and removals", function()
    local m = core.idmap()
    for i = 1, 5000 do assert.is_true(m:put("id-" .. i, i)) end
    for i = 1, 5000, 2 do assert.equal(i, m:take("id-" .. i)) end
    for i = 5001, 6000 do assert.is_true(m:put("id-" .. i, i)) end
    assert.equal(2500 + 1000, m:count())
    for i = 1, 6000 do
      local want = (i % 2 == 0 or i > 5000) and i or nil
      assert.is_true(m:get("id-" .. i) == want, "id-" .. i)
    end
    assert.equal(m:count(), #m:keys())
  end)

  it("makes room at once with reserve, keys and tombstones kept through it", function()
    local m = core.idmap()
    for i = 1, 300 do m:put("k" .. i, i) end
    for i = 1, 300, 3 do m:take("k" .. i) end
    m:reserve(20000)                        -- one rebuild: the tombstones go, the keys stay
    m:reserve(0)
    for i = 301, 20000 do assert.is_true(m:put("k" .. i, i)) end
    assert.is_false(m:put("k2", 0))         -- the first one still wins
    for i = 1, 20000 do
      local want = (i > 300 or i % 3 ~= 1) and i or nil
      assert.is_true(m:get("k" .. i) == want, "k" .. i)
    end
    assert.equal(20000 - 100, m:count())
    assert.has_error(function() m:reserve(-1) end)
  end)

  it("refuses a reserve past what memory can hold, at once", function()
    -- (not 1e12: an allocation of 16 TB fails, but AddressSanitizer aborts on it)
    for _, k in ipairs({ math.maxinteger, 1700000000000000000 }) do
      local ok, err = pcall(function() core.idmap():reserve(k) end)
      assert.is_false(ok)
      assert.matches("out of memory", tostring(err), 1, true)
    end
  end)

  it("reserves by the ids of a file's first chunk, not its lines: blank lines then a long one cost no index", function()
    local H = require "helper"
    local d = tmpdir()
    local path = write(d .. "/sparse.jsonl", ("\n"):rep(1024 * 1024) .. ('{"custom_id":"x","p":"%s"}\n'):format(("a"):rep(7 * 1024 * 1024)))
    local code = ([[
      local function hwm() for l in io.lines("/proc/self/status") do local v = l:match("^VmHWM:%%s*(%%d+)") if v then return tonumber(v) end end end
      local core = require "lbatch.core"
      local base, m = hwm(), core.idmap()
      local n = m:scan(%q, 1, 0, 1e300)
      print(n, m:count(), math.floor((hwm() - base) / 1024))]]):format(path)
    local n, count, mb = H.sh(H.lua .. " -e " .. H.q(code) .. " 2>&1"):match("(%d+)%s+(%d+)%s+(%d+)")
    assert.are.equal("1048577", n)
    assert.are.equal("1", count)
    assert.is_true(tonumber(mb) < 60, mb .. " MB")   -- (counted by lines, its 1,048,576 in the first chunk reserved 256 MB)
    os.remove(path) os.remove(d)
  end)

  it("indexes a large file in one go, its room reserved from its first chunk", function()
    local path = os.tmpname()
    local fh = assert(io.open(path, "wb"))
    for i = 1, 30000 do fh:write(('{"custom_id":"r-%06d","pad":"%s"}\n'):format(i, ("x"):rep(40 + i % 50))) end
    fh:close()
    for _, max in ipairs({ 1000000, 12345 }) do   -- (reserved up to max_lines only)
      local m = core.idmap()
      local n, nxt = m:scan(path, 1, 0, max)
      assert.equal(math.min(max, 30000), n)
      assert.equal(n, m:count())
      assert.is_true(m:has("r-000001") and m:has(("r-%06d"):format(n)))
      assert.is_false(m:has(("r-%06d"):format(n + 1)))
      assert.is_true((nxt == nil) == (max > 30000))
    end
    os.remove(path)
  end)

  it("stays fast with ids a hostile file chose to collide under plain FNV-1a", function()
    if not math.type then pending("the ids are built with 64-bit integers (Lua 5.3+)") return end
    local H = require "helper"
    -- FNV-1a's low bits depend on the low bits alone: from any state, two
    -- 4-byte blocks that meet in the low 18 bits (a birthday search), 17
    -- times over, give 2^17 ids that all fall in one slot of a plain
    -- FNV-1a map of up to 2^18 slots (each put walking them all: 8.6e9 probes)
    local code = [[
      local BITS = 18
      local MASK = (1 << BITS) - 1
      local P = 1099511628211 & MASK
      local function step(h, b) for i = 1, #b do h = ((h ~ b:byte(i)) * P) & MASK end return h end
      local h, pair, r = 1469598103934665603 & MASK, {}, 7
      for k = 1, 17 do
        local seen = {}
        while not pair[k] do
          r = (r * 1103515245 + 12345) % 2147483648
          local b = string.char(97 + r % 26, 97 + (r >> 5) % 26, 97 + (r >> 10) % 26, 97 + (r >> 15) % 26)
          local t = step(h, b)
          if seen[t] and seen[t] ~= b then pair[k], h = { seen[t], b }, t else seen[t] = b end
        end
      end
      local core = require "lbatch.core"
      local m, t0 = core.idmap(), os.clock()
      for i = 0, (1 << 17) - 1 do
        local id = {}
        for k = 1, 17 do id[k] = pair[k][(i >> (k - 1)) % 2 + 1] end
        m:put(table.concat(id), i)
      end
      print(m:count(), os.clock() - t0)]]
    local out = H.sh("timeout 60 " .. H.lua .. " -e " .. H.q(code) .. " 2>&1")
    local n, secs = out:match("^(%d+)%s+([%d.]+)")
    assert.are.equal("131072", n, out)                     -- (all distinct, all kept)
    assert.is_true(tonumber(secs) < 3, secs .. " s")       -- (plain FNV-1a: minutes)
  end)

  it("clears, and is usable after", function()
    local m = core.idmap()
    for i = 1, 100 do m:put(tostring(i), i) end
    m:clear()
    assert.equal(0, m:count())
    assert.same({}, m:keys())
    assert.is_nil(m:get("1"))
    assert.is_true(m:put("1", 2))
    assert.equal(2, m:get("1"))
  end)

  it("refuses what is not an idmap", function()
    local m = core.idmap()
    assert.has_error(function() m.get({}, "a") end)
    assert.has_error(function() m:put({}, 1) end)
  end)
end)

describe("idmap:scan", function()
  local dir, path, offs
  -- line i begins at offs[i]
  local lines = {
    '{"custom_id":"a","x":1}\n',
    '\n',                                     -- blank: read, neither indexed nor hard
    '\r\n',                                   -- blank too
    '{"custom_id":"b"}\r\n',                  -- CRLF
    '{"x":1}\n',                              -- no id: hard
    '{"custom_id":"e\\u0041"}\n',             -- an escape: hard
    '{"custom_id":"a","x":2}\n',              -- a duplicate: the first one wins
    '{"body":"' .. ("y"):rep(1500000) .. '","custom_id":"long"}\n',  -- across the 1 MB reads
    '{"custom_id":"c"}',                      -- no newline at the end
  }

  setup(function()
    dir = tmpdir()
    offs = {}
    local at = 0
    for i, l in ipairs(lines) do offs[i] = at; at = at + #l end
    path = write(dir .. "/r.jsonl", table.concat(lines))
  end)

  teardown(function()
    os.remove(path)
    os.remove(dir .. "/big.jsonl")
    os.remove(dir)
  end)

  it("indexes each custom_id at its file and byte offset, and lists the lines it cannot read cheaply", function()
    local m = core.idmap()
    local n, nxt, hard = m:scan(path, 3)
    assert.equal(#lines, n)
    assert.is_nil(nxt)                        -- the end of the file
    assert.same({ offs[5], offs[6] }, hard)
    assert.same({ "a", "b", "c", "long" }, sorted(m:keys()))
    assert.equal(3 * SPAN + offs[1], m:get("a"))
    assert.equal(3 * SPAN + offs[4], m:get("b"))
    assert.equal(3 * SPAN + offs[8], m:get("long"))
    assert.equal(3 * SPAN + offs[9], m:get("c"))
  end)

  it("reads at most max_lines from start, and says where to go on", function()
    local m = core.idmap()
    local n, nxt, hard = m:scan(path, 0, 0, 4)
    assert.equal(4, n)
    assert.equal(offs[5], nxt)
    assert.same({}, hard)
    assert.same({ "a", "b" }, sorted(m:keys()))
    n, nxt, hard = m:scan(path, 0, nxt, 4)
    assert.equal(4, n)
    assert.equal(offs[9], nxt)
    assert.same({ offs[5], offs[6] }, hard)
    assert.equal(0 * SPAN + offs[1], m:get("a"))   -- line 7's duplicate did not replace it
    n, nxt = m:scan(path, 0, nxt)
    assert.equal(1, n)
    assert.is_nil(nxt)
    assert.equal(offs[9], m:get("c"))
  end)

  it("counts only the ids in a filter, and drops with drop", function()
    local f = core.idmap()
    f:put("b")
    f:put("c")
    f:put("zz")
    local m = core.idmap()
    m:scan(path, 1, 0, nil, f)
    assert.same({ "b", "c" }, sorted(m:keys()))
    local all = core.idmap()
    all:scan(path, 1)
    all:put("kept", 1)
    all:scan(path, 1, 0, nil, f, true)        -- drops b and c only
    assert.same({ "a", "kept", "long" }, sorted(all:keys()))
    all:scan(path, 1, 0, nil, nil, true)      -- drops every id in the file
    assert.same({ "kept" }, all:keys())
  end)

  it("lists a line over its line limit as hard, and reads on after it", function()
    local big = '{"custom_id":"big","p":"' .. ("z"):rep(9 * 1024 * 1024) .. '"}\n'
    local p = write(dir .. "/big.jsonl", big .. '{"custom_id":"after"}\n')
    local m = core.idmap()
    local n, nxt, hard = m:scan(p, 0)
    assert.equal(2, n)
    assert.is_nil(nxt)
    assert.same({ 0 }, hard)
    assert.same({ "after" }, m:keys())
    assert.equal(#big, m:get("after"))
  end)

  it("gives nil and the reason for a file it cannot open", function()
    local n, why = core.idmap():scan(dir .. "/missing.jsonl", 0)
    assert.is_nil(n)
    assert.truthy(why:find("missing.jsonl", 1, true))
    assert.truthy(why:find("No such file", 1, true))
  end)
end)

describe("the core's system calls", function()
  it("mkdir makes every missing directory of a path, like mkdir -p", function()
    local d = tmpdir()
    local deep = d .. "/a/b/c"
    assert.is_true(core.mkdir(deep))
    assert.is_true(core.mkdir(deep))          -- there already: fine
    assert.is_true(core.mkdir(deep .. "/"))
    write(deep .. "/f", "x")
    assert.equal("x", slurp(deep .. "/f"))
    local ok, why = core.mkdir(deep .. "/f/g")  -- under a file
    assert.is_nil(ok)
    assert.truthy(why:find(deep .. "/f/g", 1, true))
    ok, why = core.mkdir("")
    assert.is_nil(ok)
    assert.is_string(why)
    os.remove(deep .. "/f")
    os.remove(deep); os.remove(d .. "/a/b"); os.remove(d .. "/a"); os.remove(d)
  end)

  it("fsync syncs a file or a directory, or gives nil and the reason", function()
    local d = tmpdir()
    write(d .. "/f", "x")
    assert.is_true(core.fsync(d .. "/f"))
    assert.is_true(core.fsync(d))
    local ok, why = core.fsync(d .. "/none")
    assert.is_nil(ok)
    assert.matches("fsync .*/none: No such file", why)
    os.remove(d .. "/f") os.remove(d)
  end)

  it("fsync works in a program started with stdin closed (a daemon: the file it opens is fd 0)", function()
    local H = require "helper"
    local d = tmpdir()
    write(d .. "/f", "x")
    local code = ([[
      assert(io.open("/proc/self/fd/0") == nil, "stdin is open")
      local core = require "lbatch.core"
      print(core.fsync(%q), core.fsync(%q))]]):format(d .. "/f", d)
    assert.equal("true\ttrue\n", H.sh(H.lua .. " -e " .. H.q(code) .. " <&- 2>&1"))
    os.remove(d .. "/f") os.remove(d)
  end)

  it("a lock taken as fd 0 (stdin closed) is freed when the collector takes it", function()
    local H = require "helper"
    local d = tmpdir()
    local code = ([[
      assert(io.open("/proc/self/fd/0") == nil, "stdin is open")
      local core = require "lbatch.core"
      local lk = assert(core.lock(%q))
      local fd0 = io.open("/proc/self/fd/0") ~= nil
      lk = nil; collectgarbage(); collectgarbage()
      local again, kind = core.lock(%q)
      print(fd0, again ~= nil, kind)]]):format(d .. "/lock", d .. "/lock")
    assert.equal("true\ttrue\tnil\n", H.sh(H.lua .. " -e " .. H.q(code) .. " <&- 2>&1"))
    os.remove(d .. "/lock") os.remove(d)
  end)

  it("disk_free gives the bytes left, or nil and the reason", function()
    local n = core.disk_free("/tmp")
    assert.is_number(n)
    assert.is_true(n > 0)
    local none, why = core.disk_free("/nonexistent/lbatch")
    assert.is_nil(none)
    assert.truthy(why:find("/nonexistent/lbatch", 1, true))
  end)

  it("now is monotonic seconds, and sleep waits", function()
    local t0 = core.now()
    assert.is_number(t0)
    local prev = t0
    for _ = 1, 1000 do
      local t = core.now()
      assert.is_true(t >= prev)
      prev = t
    end
    core.sleep(0.05)
    local d = core.now() - t0
    assert.is_true(d >= 0.045, "slept " .. d)
    assert.is_true(d < 5, "slept " .. d)
    core.sleep(0)
    core.sleep(-1)
  end)

  it("version gives libcurl's version and whether it speaks HTTP/2", function()
    local v, h2 = core.version()
    assert.truthy(v:match("^%d+%.%d+%.%d+"))
    assert.is_boolean(h2)
  end)

  it("trap turns SIGTERM into a flag that caught reads", function()
    local lua = require("helper").lua     -- (under AddressSanitizer, with its runtime)
    local code = 'local c = require "lbatch.core"; io.write(tostring((c.caught())), " "); c.trap(); '
      .. 'os.execute("kill -TERM $PPID"); io.write(tostring((c.caught())))'
    local p = assert(io.popen(lua .. " -e '" .. code .. "'"))
    local out = p:read("*a")
    p:close()
    assert.equal("nil 15", out)
  end)
end)

describe("the byte scanners", function()
  it("utf8_check: nil for valid UTF-8, else the 1-based offset of the first bad byte", function()
    for _, s in ipairs({ "", "plain", "h\195\169llo", "\226\130\172", "\240\159\152\128", "a\0b",
                         "\244\143\191\191" }) do
      assert.is_nil(core.utf8_check(s), s)
    end
    local bad = {
      { "\255", 1 },
      { "ab\195", 3 },                         -- cut short
      { "a\226\130", 2 },
      { "\192\175", 1 },                       -- overlong
      { "\224\128\128", 1 },                   -- overlong, 3 bytes
      { "x\237\160\128", 2 },                  -- a surrogate
      { "\244\144\128\128", 1 },               -- past U+10FFFF
      { "ok\128", 3 },                         -- a lone continuation byte
      { "\195\40", 1 },                        -- a lead byte without its continuation
      { "h\195\169llo\254", 7 },
    }
    for _, c in ipairs(bad) do
      assert.equal(c[2], core.utf8_check(c[1]), ("%q"):format(c[1]))
    end
  end)

  it("json_string: a top-level key's plain string; nil when absent; false when it cannot tell cheaply", function()
    local J = core.json_string
    assert.equal("x1", J('{"custom_id":"x1"}', "custom_id"))
    assert.equal("q", J('  { "a" : 1 , "b":[1,{"c":"}"}], "custom_id" : "q" }  ', "custom_id"))
    assert.equal("z", J('{"a":"}\\"{","custom_id":"z"}', "custom_id"))
    assert.equal("", J('{"custom_id":""}', "custom_id"))
    assert.equal("2", J('{"k":"1","k":"2"}', "k"))       -- the last one counts
    assert.is_nil(J('{"a":"custom_id"}', "custom_id"))
    assert.is_nil(J('{"a":{"custom_id":"nested"}}', "custom_id"))
    assert.is_nil(J("{}", "custom_id"))
    assert.is_false(J('{"custom_id":"a\\u0041"}', "custom_id"))   -- an escape
    assert.is_false(J('{"custom_id":7}', "custom_id"))            -- not a string
    assert.is_false(J('{"c\\u0075stom_id":"x"}', "custom_id"))    -- an escaped key
    assert.is_false(J('{"custom_id":"x"', "custom_id"))           -- never closed
    assert.is_false(J('{"custom_id":"x"} tail', "custom_id"))
    assert.is_false(J('[{"custom_id":"x"}]', "custom_id"))
    assert.is_false(J("", "custom_id"))
    assert.is_false(J('{"custom_id" "x"}', "custom_id"))
  end)
end)

describe("a controller that never steps", function()
  it("queues, reports progress, cancels and closes without any request going out", function()
    local ctl = core.new({ max_connections = 2 })
    assert.same({ 0, 0, 0 }, { ctl:pending() })
    assert.is_number(ctl:pollfd())
    local id = ctl:add({ url = "http://127.0.0.1:9/", method = "GET" })
    assert.is_number(id)
    assert.same({ 1, 1, 0 }, { ctl:pending() })
    assert.equal(0, ctl:timeout())            -- a transfer waits to start
    assert.same({ 0, -1, 0, -1 }, { ctl:progress(id) })
    assert.is_nil(ctl:progress(id + 1))
    assert.is_nil(ctl:done())
    assert.is_true(ctl:cancel(id))
    assert.is_false(ctl:cancel(id))
    assert.same({ 0, 0, 0 }, { ctl:pending() })
    assert.equal(id + 1, ctl:add({ url = "http://127.0.0.1:9/" }))
    ctl:close()
    ctl:close()
    assert.has_error(function() ctl:pending() end, "lbatch.core: controller is closed")
  end)

  it("fails a transfer whose local file is not usable with io, before any request", function()
    local ctl = core.new()
    local d = tmpdir()
    local id, fail, why = ctl:add({ url = "http://127.0.0.1:9/", form = { { name = "file", file = d .. "/none" } } })
    assert.same({ nil, "io" }, { id, fail })
    assert.truthy(why:find(d .. "/none", 1, true))
    id, fail, why = ctl:add({ url = "http://127.0.0.1:9/", form = { { name = "file", file = d } } })
    assert.same({ nil, "io" }, { id, fail })
    assert.truthy(why:find("a directory", 1, true))
    id, fail, why = ctl:add({ url = "http://127.0.0.1:9/", download = d })
    assert.same({ nil, "io" }, { id, fail })
    assert.truthy(why:find("a directory", 1, true))
    -- the whole body from a file (a presigned PUT): the same checks
    id, fail, why = ctl:add({ url = "http://127.0.0.1:9/", method = "PUT", upload = d .. "/none" })
    assert.same({ nil, "io" }, { id, fail })
    assert.truthy(why:find(d .. "/none", 1, true))
    id, fail, why = ctl:add({ url = "http://127.0.0.1:9/", method = "PUT", upload = d })
    assert.same({ nil, "io" }, { id, fail })
    assert.truthy(why:find("a directory", 1, true))
    assert.is_table(core.FAIL[fail])
    assert.same({ 0, 0, 0 }, { ctl:pending() })
    ctl:close()
    os.remove(d)
  end)

  it("checks a spec before it allocates anything", function()
    local ctl = core.new()
    assert.has_error(function() ctl:add({}) end, "lbatch.core: spec.url is required")
    assert.has_error(function() ctl:add({ url = "http://x/", headers = { "A: b\r\nC: d" } }) end)
    assert.has_error(function() ctl:add({ url = "http://x/", timeout = -1 }) end)
    assert.has_error(function() ctl:add({ url = "http://x/", form = { { value = "v" } } }) end)
    assert.same({ 0, 0, 0 }, { ctl:pending() })
    ctl:close()
  end)
end)

describe("base64", function()
  -- a webhook secret (whsec_...) is base64: every one of its 64 letters decodes
  it("decodes base64 over its whole alphabet, and refuses what is not base64", function()
    local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    local function encode(bytes)                  -- an independent encoder (RFC 4648)
      local out = {}
      for i = 1, #bytes, 3 do
        local a, b, c = bytes:byte(i, i + 2)
        local n = a * 65536 + (b or 0) * 256 + (c or 0)
        local q = { math.floor(n / 262144) % 64, math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }
        for k = 1, 4 do out[#out + 1] = A:sub(q[k] + 1, q[k] + 1) end
        if not c then out[#out] = "=" end
        if not b then out[#out - 1] = "=" end
      end
      return table.concat(out)
    end
    -- bytes whose encoding holds each letter: 3 bytes per 4 letters, letters k, k+1, k+2, k+3
    for k = 0, 63 do
      local n = k * 262144 + ((k + 1) % 64) * 4096 + ((k + 2) % 64) * 64 + (k + 3) % 64
      local bytes = string.char(math.floor(n / 65536), math.floor(n / 256) % 256, n % 256)
      local text = encode(bytes)
      assert.are.equal(A:sub(k + 1, k + 1), text:sub(1, 1))
      assert.are.equal(bytes, core.unbase64(text), text)
    end
    for _, n in ipairs({ 1, 2, 3, 4, 5, 32 }) do
      local bytes = ("\0\255\127\128x"):rep(7):sub(1, n)
      assert.are.equal(bytes, core.unbase64(encode(bytes)), n)
    end
    for _, bad in ipairs({ "QUJD RA==", "QUJ", "QU=D", "QUJD\n", "QUJD-_==", "Q===" }) do
      assert.is_nil(core.unbase64(bad), bad)
    end
  end)
end)

describe("a controller that steps", function()
  it("step() returns at once while a finished transfer waits to be collected, whatever wait it is given", function()
    local ctl = core.new()
    local id = ctl:add({ url = "http://127.0.0.1:9/", method = "GET" })      -- refused at once: it ends
    local t0 = core.now()
    repeat ctl:step(10) until select(3, ctl:pending()) == 0 or core.now() - t0 > 5
    local total, queued, active = ctl:pending()
    assert.are.same({ 1, 0, 0 }, { total, queued, active })            -- done, not yet collected
    local t = core.now()
    ctl:step(3000)
    assert.is_true(core.now() - t < 1, "step(3000) blocked with a result waiting")
    assert.are.equal(id, (ctl:done()))
    ctl:close()
  end)
end)


describe("core.lock", function()
  local function pid()
    local f = assert(io.open("/proc/self/stat"))
    local n = tonumber(f:read("*l"):match("^(%d+)"))
    f:close()
    return n
  end

  it("is exclusive, names its holder in the file, and is free again once released", function()
    local dir = tmpdir()
    local path = dir .. "/lock"
    local lk = assert(core.lock(path))
    local h = require("cjson").decode(slurp(path))
    assert.are.equal(pid(), h.pid)
    assert.is_string(h.host)
    assert.matches("^%d%d%d%d%-%d%d%-%d%dT%d%d:%d%d:%d%dZ$", h.started)
    local none, kind, text = core.lock(path)        -- flock: one open file against another, even in one process
    assert.is_nil(none)
    assert.are.equal("busy", kind)
    assert.are.equal(slurp(path), text)
    assert.are.same({ 1, "x" }, { lk:release(1, "x") })
    assert.are.equal("", slurp(path))
    local again = assert(core.lock(path))
    again:release()
    again:release()                                  -- twice: nothing
    os.execute("rm -rf " .. dir)
  end)

  it("refuses a symbolic link and a missing directory with the OS's reason", function()
    local dir = tmpdir()
    assert(os.execute("ln -s /etc/hostname " .. dir .. "/lock"))
    local none, kind, why = core.lock(dir .. "/lock")
    assert.is_nil(none)
    assert.are.equal("io", kind)
    assert.matches("symbolic links", why)
    assert.are.equal("io", (select(2, core.lock(dir .. "/nowhere/lock"))))
    os.execute("rm -rf " .. dir)
  end)

  it("is freed by the kernel when its holder is killed with kill -9", function()
    local dir = tmpdir()
    local path = dir .. "/lock"
    local lua = require("helper").lua     -- (under AddressSanitizer, with its runtime)
    local holder = ("%s -e 'local core = require \"lbatch.core\"; local lk = assert(core.lock(%q)); core.sleep(60)'"
      .. " >/dev/null 2>&1 & echo $!"):format(lua, path)
    local p = io.popen(holder)
    local child = tonumber(p:read("*l"))
    p:close()
    local function text_of()
      local f = io.open(path, "rb")
      local s = f and f:read("*a") or ""
      if f then f:close() end
      return s
    end
    local t0 = core.now()
    while not text_of():find('"pid"') and core.now() - t0 < 10 do core.sleep(0.02) end
    local _, kind, text = core.lock(path)
    assert.are.equal("busy", kind)
    assert.are.equal(child, require("cjson").decode(text).pid)
    os.execute("kill -9 " .. child)
    local lk
    t0 = core.now()
    repeat lk = core.lock(path) core.sleep(0.02) until lk or core.now() - t0 > 5
    assert.is_truthy(lk, "the lock of a killed holder stays taken")
    lk:release()
    os.execute("rm -rf " .. dir)
  end)
end)

describe("core.hex", function()
  it("writes every byte as two lower-case hex digits", function()
    local bytes, want = {}, {}
    for b = 0, 255 do bytes[#bytes + 1], want[#want + 1] = string.char(b), ("%02x"):format(b) end
    assert.are.equal(table.concat(want), core.hex(table.concat(bytes)))
    assert.are.equal("", core.hex(""))
  end)
end)

describe("core.line_at", function()
  it("reads a line at an offset, and refuses a closed file (no read of freed memory)", function()
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    f:write("one\ntwo\r\n")
    f:close()
    f = assert(io.open(path, "rb"))
    assert.are.equal("two", core.line_at(f, 4))
    f:close()
    local ok, err = pcall(core.line_at, f, 4)
    os.remove(path)
    assert.is_false(ok)
    assert.matches("the file is closed", tostring(err), 1, true)
  end)

  it("reads lines longer than its first read, whole, and nil past the end", function()
    local path = os.tmpname()
    local long = {}
    for i, n in ipairs({ 2047, 2048, 2049, 4096, 300001 }) do long[i] = ("%d"):format(i):rep(n) end
    local f = assert(io.open(path, "wb"))
    f:write(table.concat(long, "\n"), "\r\n")
    f:close()
    f = assert(io.open(path, "rb"))
    local at = 0
    for _, l in ipairs(long) do
      assert.are.equal(l, core.line_at(f, at))
      at = at + #l + 1
    end
    assert.is_nil(core.line_at(f, at + 1))
    f:close()
    os.remove(path)
  end)
end)

describe("the built core's exported symbols", function()
  it("are luaopen_lbatch_core alone (every other symbol is hidden)", function()
    local so = package.searchpath("lbatch.core", package.cpath)
    assert.is_truthy(so)
    local probe = io.popen("command -v nm 2>/dev/null")
    local nm = probe:read("*l")
    probe:close()
    if not nm or nm == "" then return pending("nm is not on PATH") end
    local p = io.popen("nm -D --defined-only '" .. so .. "' 2>&1")
    local names = {}
    for line in p:lines() do
      local kind, name = line:match("^%x*%s+(%a)%s+(%S+)$")
      if kind and kind:match("[A-Z]") and name then names[#names + 1] = name end
    end
    p:close()
    assert.are.same({ "luaopen_lbatch_core" }, names)
  end)
end)

-- core.window, the join's fetch (lbatch/core/fetch.c), on its own: an index
-- of answer files (idmap:scan), a window of input lines, its answers read
describe("core.window", function()
  local function write_lines(path, lines) return write(path, table.concat(lines, "\n") .. "\n") end
  local function request(i) return ('{"custom_id":"w-%05d","body":{}}'):format(i) end
  local function answer(i, size)
    return ('{"custom_id":"w-%05d","response":{"status_code":200,"body":{"choices":[{"message":{"content":"%s"}}]}}}')
      :format(i, ("a"):rep(size))
  end
  -- inputs 1..n and their answers (sizes(i) bytes of content), shuffled;
  -- the index, the window with its inputs read, the answer file's handles
  local function setup_case(n, sizes)
    local dir = tmpdir()
    local ins, outs = {}, {}
    for i = 1, n do ins[i], outs[i] = request(i), answer(i, sizes(i)) end
    for i = n, 2, -1 do local j = (i * 7919) % i + 1 outs[i], outs[j] = outs[j], outs[i] end
    local out = write_lines(dir .. "/a.out.jsonl", outs)
    local found = core.idmap()
    assert(found:scan(out, 1, 0, n + 1))
    local fh = assert(io.open(write_lines(dir .. "/a.in.jsonl", ins), "rb"))
    local win = core.window()
    assert.are.equal(n, (win:read(fh, 0, nil, n, 64 * 1024 * 1024, 8 * 1024 * 1024)))
    fh:close()
    local h = assert(io.open(out, "rb"))
    return { win = win, found = found, out = out, handles = { h }, sizes = { h:seek("end") }, lines = outs }
  end

  it("stops a window before the answer that would take it past its 32 MB, and goes on from there", function()
    local n = 70
    local c = setup_case(n, function(i) return 900 * 1024 + i end)   -- 63 MB of answers
    local by_id, k, fills = {}, 1, 0
    for _, l in ipairs(c.lines) do by_id[l:match('"(w%-%d+)"')] = l end
    while k <= n do
      local last = assert(c.win:fill(c.found, k, n, c.handles, c.sizes))
      assert.is_true(last >= k and (last - k + 1) * 900 * 1024 <= 32 * 1024 * 1024, "a window of " .. (last - k + 1))
      for i = k, last do
        local text, line = c.win:take(i)
        assert.are.equal(by_id[text:match('"(w%-%d+)"')], line)   -- each input's own answer, whole
      end
      k, fills = last + 1, fills + 1
    end
    assert.are.equal(2, fills)
  end)

  it("fails a fill whose answer file shrank, or whose answer is not its indexed length", function()
    local c = setup_case(50, function(i) return 10 + i end)
    local f = assert(io.open(c.out, "r+b"))
    f:write("{}\n")                               -- its first line 2 bytes now, the file no shorter
    f:close()
    local last, why, file = c.win:fill(c.found, 1, 50, c.handles, c.sizes)
    assert.is_nil(last)
    assert.are.equal("the file changed since it was indexed", why)
    assert.are.equal(1, file)
    c = setup_case(50, function(i) return 10 + i end)
    f = assert(io.open(c.out, "wb"))
    f:write(c.lines[1], "\n")                     -- cut after its first line
    f:close()
    last, why = c.win:fill(c.found, 1, 50, c.handles, c.sizes)
    assert.is_nil(last)
    assert.are.equal("the file is shorter than when it was indexed", why)
  end)
end)
