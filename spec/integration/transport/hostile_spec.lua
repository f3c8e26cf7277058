-- The hostile kit: lbatch against servers written to be nasty (spec/hostile)
-- and against inputs that are not what they seem. Each case is a defect a
-- hostile server or an unlucky user found; each must hold on Lua 5.4, on
-- LuaJIT and under AddressSanitizer. spec/run-all prints how many ran.
local H = require "helper"
local lbatch = require "lbatch"
local core = require "lbatch.core"

local KEY = "sk-hostile-kit-0123456789-abcdefghij-KLMNOP"

-- the key, or any 8 bytes of it, appear nowhere in s
local function clean_of_key(s, what)
  s = tostring(s)
  for i = 1, #KEY - 7 do
    assert.is_nil(s:find(KEY:sub(i, i + 7), 1, true), what .. " shows part of the key: " .. s)
  end
end

-- every string in a (nested) table
local function each_string(t, fn, seen)
  seen = seen or {}
  if seen[t] then return end
  seen[t] = true
  for k, v in pairs(t) do
    if type(v) == "string" then fn(v, tostring(k)) elseif type(v) == "table" then each_string(v, fn, seen) end
    if type(k) == "string" then fn(k, "a key") end
  end
end

local function is_error(err, kind)
  assert.is_true(lbatch.is_error(err), tostring(err))
  if kind then assert.are.equal(kind, err.kind, tostring(err)) end
  assert.is_nil(tostring(err):find("[\r\n%z]"))
end

describe("the hostile kit", function()
  local srv, emu, dir
  setup(function()
    srv = H.hostile()
    emu = H.emulator({ speed = 200, rate_limits = false, dialect = "openai" })
    dir = H.tmpdir()
  end)
  teardown(function() srv.stop() emu.stop() end)
  before_each(function() srv.reset() H.http("DELETE", emu.url .. "/_emulator/faults") end)

  local function client(scenario, opts)
    opts = opts or {}
    opts.api_key = opts.api_key or KEY
    opts.base_url = opts.base_url or srv.at(scenario)
    if opts.max_retries == nil then opts.max_retries = 0 end
    return lbatch.new(opts)
  end

  describe("the key never shows", function()
    it("when a server echoes it into every error field and header", function()
      local c = client("echo")
      local v, err = c:retrieve("batch_1")
      assert.is_nil(v)
      is_error(err, "http")
      each_string(err, function(s, k) clean_of_key(s, "err." .. k) end)
      clean_of_key(tostring(err), "tostring(err)")
      c:close()
    end)

    it("when a long message is cut, and the cut falls inside the key", function()
      local c = client("echo_cut")
      local _, err = c:list_batches()
      is_error(err, "http")
      each_string(err, function(s, k) clean_of_key(s, "err." .. k) end)
      c:close()
    end)

    it("when a server echoes a piece of it", function()
      local c = client("echo_fragment")
      local _, err = c:list_batches()
      clean_of_key(tostring(err), "tostring(err)")
      assert.matches("your key begins %*%*%*", err.message)
      c:close()
    end)

    it("when a successful answer carries it, in its data and headers", function()
      local c = client("echo_success")
      local b, response = c:retrieve("batch_1", { with_response = true })
      assert.are.equal(200, response.status)
      assert.are.equal("completed", b.status)
      each_string(b, function(s, k) clean_of_key(s, "batch." .. k) end)
      each_string(response, function(s, k) clean_of_key(s, "response." .. k) end)
      c:close()
    end)

    it("in the command's stderr and --json output", function()
      local out = H.sh(("env DASHSCOPE_API_KEY=%s LBATCH_BASE_URL=%s %s %s/bin/lbatch status --json batch_1 2>&1")
        :format(KEY, srv.at("echo"), H.lua, H.root))
      assert.matches('"kind":"http"', out)
      clean_of_key(out, "the command's output")
    end)

    it("nor do secret headers the user adds", function()
      local secret = "tok-0123456789abcdefghijklmn"
      local c = client("echo", { headers = { ["X-Api-Token"] = secret } })
      local _, err = c:retrieve("batch_1")
      assert.is_nil(tostring(err):find(secret:sub(1, 8), 1, true))
      c:close()
    end)
  end)

  describe("lists", function()
    it("end with an error when the cursor never moves (each_batch)", function()
      local c = client("cursor_loop")
      local n, failure = 0, nil
      for b, err in c:each_batch() do
        if not b then failure = err break end
        n = n + 1
        assert.is_true(n < 10, "looping")
      end
      is_error(failure, "decode")
      assert.are.equal("pagination_loop", failure.code)
      assert.are.equal(1, n)
      assert.are.equal(2, srv.stats()["requests:cursor_loop"])
      c:close()
    end)

    it("end with an error when a page brings nothing and says has_more (each_file)", function()
      local c = client("cursor_empty")
      local failure
      for f, err in c:each_file() do if not f then failure = err break end end
      is_error(failure, "decode")
      c:close()
    end)

    it("and `lbatch list --all` too", function()
      local out = H.sh(("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s timeout 20 %s %s/bin/lbatch list --all 2>&1; echo exit=$?")
        :format(srv.at("cursor_loop"), H.lua, H.root))
      assert.matches("pagination_loop", out)
      assert.matches("exit=1", out)
    end)

    it("skip nulls and non-objects in data instead of stopping", function()
      local c = client("null_data")
      local ids = {}
      for b, err in c:each_batch() do
        assert.is_truthy(b, tostring(err))
        ids[#ids + 1] = b.id
      end
      assert.are.same({ "batch_1", "batch_2" }, ids)
      c:close()
    end)
  end)

  describe("time", function()
    it("one stalled transfer does not hold up the others on http:// (no head-of-line blocking)", function()
      local c = client("stall_first", { stall_timeout = 2 })
      local done, t0 = {}, H.now()
      local tasks = {}
      for i = 1, 16 do
        tasks[i] = c:spawn(function()
          local p, err = c:list_batches()
          done[#done + 1] = H.now() - t0
          return p, err
        end)
      end
      assert(c:run())
      table.sort(done)
      assert.is_true(done[15] < 1, ("the 15 others took %.2f s"):format(done[15]))
      local stalled = 0
      for _, t in ipairs(tasks) do
        local p, err = t:join()
        if not p then stalled = stalled + 1 is_error(err, "timeout") assert.are.equal("stalled", err.code) end
      end
      assert.are.equal(1, stalled)
      c:close()
    end)

    it("stall_timeout below a second works (0.4 s)", function()
      local c = client("stall", { stall_timeout = 0.4 })
      local t0 = H.now()
      local _, err = c:list_batches()
      local took = H.now() - t0
      is_error(err, "timeout")
      assert.is_true(took >= 0.35 and took < 1.5, ("took %.2f s"):format(took))
      c:close()
    end)

    it("a drip of bytes is slow but not stalled", function()
      local c = client("drip-30", { stall_timeout = 0.3 })
      assert.is_truthy(c:list_batches())
      c:close()
    end)

    it("a download to a file is bound by transfer_timeout, not the API call's timeout", function()
      local c = client("drip-30", { timeout = 0.5 })            -- the body takes about 1.4 s
      local path = H.tmpdir() .. "/content"
      assert.are.equal(path, (assert(c:content("file-x", { path = path }))))   -- streamed: no bound
      assert.matches('^{"object":"list"', H.read(path))
      local _, err = c:content("file-x")                         -- into memory: an API call, 0.5 s
      is_error(err, "timeout")
      c:close()
    end)

    it("a download's progress gives an empty body's size as 0, not as unknown", function()
      local c = client("empty")
      local path, reports = H.tmpdir() .. "/content", {}
      assert(c:content("file-x", { path = path, on_progress = function(done, total)
        reports[#reports + 1] = { done, total } end }))
      assert.are.equal("", H.read(path))
      assert.is_true(#reports > 0)
      assert.are.same({ 0, 0 }, reports[#reports])
      c:close()
    end)

    it("wait refuses a negative, zero or NaN interval instead of polling without end", function()
      local c = client("count")
      for _, bad in ipairs({ { interval = -1 }, { interval = 0 }, { interval = 0 / 0 }, { max_interval = -5 },
                             { factor = 0.5 }, { deadline = -1 }, { jitter = 2 } }) do
        assert.has_error(function() c:wait("batch_1", bad) end)
      end
      c:close()
    end)
  end)

  describe("what is sent", function()
    it("ids that are empty or dot segments are refused before any request", function()
      local c = client("count")
      for _, id in ipairs({ "", ".", "..", "a/b", "x\n", "%2e%2e" }) do
        for _, op in ipairs({ "retrieve", "cancel", "file", "delete_file", "content" }) do
          local v, err = c[op](c, id)
          assert.is_nil(v)
          is_error(err, "invalid")
          assert.are.equal("invalid_id", err.code)
        end
      end
      assert.is_nil(srv.stats()["requests:count"])
      c:close()
    end)

    it("a base_url without https:// is refused; plain http only to this machine or when asked", function()
      assert.has_error(function() lbatch.new({ api_key = KEY, base_url = "dashscope.aliyuncs.com/compatible-mode/v1" }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, base_url = "ftp://example.com/v1" }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, base_url = "http://example.com/v1" }) end)
      lbatch.new({ api_key = KEY, base_url = "http://example.com/v1", allow_http = true }):close()
      lbatch.new({ api_key = KEY, base_url = "http://localhost:1/v1" }):close()
    end)

    it("CR, LF or NUL in the key or a header value is refused (no header smuggling)", function()
      assert.has_error(function() lbatch.new({ api_key = KEY .. "\r\nX-Evil: 1" }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, headers = { ["X-A"] = "1\r\nX-Evil: 1" } }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, headers = { ["Bad Name"] = "1" } }) end)
      local c = client("count")
      assert.has_error(function() c:list_batches(nil, { headers = { ["X-A"] = "a\nb" } }) end)
      c:close()
    end)

    it("option values are checked: negative, zero, NaN and wrong types raise with the option's name", function()
      for k, v in pairs({ timeout = -1, connect_timeout = 0, stall_timeout = 0 / 0, max_retries = 1.5,
                          max_connections = 0, cainfo = 5, capath = {}, proxy = true, max_response_bytes = -1 }) do
        local ok, msg = pcall(lbatch.new, { api_key = KEY, [k] = v })
        assert.is_false(ok, k)
        assert.matches("lbatch.new: " .. k, msg)
      end
      local ok, msg = pcall(lbatch.new, { api_key = KEY, regoin = "intl" })   -- misspelt: not ignored
      assert.is_false(ok)
      assert.matches("lbatch.new: unknown option regoin", msg)
    end)
  end)

  describe("uploads", function()
    it("take regular files only: a FIFO (without blocking), a directory and a device are io errors", function()
      local c = client("count")
      local fifo = dir .. "/fifo"
      H.ok("mkfifo " .. fifo)
      local t0 = H.now()
      for _, path in ipairs({ fifo, dir, "/dev/zero", "/dev/null" }) do
        local v, err = c:upload(path)
        assert.is_nil(v)
        is_error(err, "io")
        assert.matches("it is a", err.message)
      end
      assert.is_true(H.now() - t0 < 10)   -- (a FIFO opened for reading would block until a writer comes)
      assert.is_nil(srv.stats()["requests:count"])
      c:close()
    end)

    it("are not sent twice when the server stored the file and the connection dropped", function()
      local c = lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 2 })
      local path = H.requests(dir .. "/stored.jsonl", 3)
      local _, before = H.json("GET", emu.url .. "/_emulator/stats")
      before = before.routes ~= nil and type(before.routes) == "table" and before.routes["POST /files"] or 0
      H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/files$", mode = "close" } })
      local f = assert(c:upload(path))
      local _, after = H.json("GET", emu.url .. "/_emulator/stats")
      assert.are.equal(before + 1, after.routes["POST /files"])
      local same = 0
      for x in c:each_file() do if x.filename == "stored.jsonl" then same = same + 1 end end
      assert.are.equal(1, same)
      assert.are.equal(f.id, (select(2, H.json("GET", emu.base .. "/files/" .. f.id))).id)
      c:close()
    end)
  end)

  describe("downloads", function()
    local file
    before_each(function()
      if not file then
        local c = lbatch.new({ api_key = "k", base_url = emu.base })
        file = assert(c:upload(H.requests(dir .. "/dl.jsonl", 5)))
        c:close()
      end
    end)

    local function stats() return (select(2, H.json("GET", emu.url .. "/_emulator/stats"))).routes["GET /files/{id}/content"] or 0 end

    it("never replace a symlink, a device or a directory, and send nothing for them", function()
      local c = lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 3 })
      local victim = H.write(dir .. "/victim.txt", "precious")
      H.ok(("ln -sf %s %s/link.jsonl"):format(victim, dir))
      local before = stats()
      for _, target in ipairs({ dir .. "/link.jsonl", "/dev/null", dir }) do
        local v, err = c:content(file.id, { path = target })
        assert.is_nil(v)
        is_error(err, "io")
      end
      assert.are.equal(before, stats())
      assert.are.equal("precious", H.read(victim))
      assert.is_true(H.ok("test -L " .. dir .. "/link.jsonl"))
      assert.is_true(H.ok("test -c /dev/null"))
      c:close()
    end)

    it("keep the mode of the file they replace", function()
      local c = lbatch.new({ api_key = "k", base_url = emu.base })
      local target = H.write(dir .. "/ro.jsonl", "old")
      H.ok("chmod 0444 " .. target)
      assert.are.equal(target, c:content(file.id, { path = target }))
      assert.are.equal("444", H.sh("stat -c %a " .. target):gsub("%s+", ""))
      assert.are.equal(H.read(dir .. "/dl.jsonl"), H.read(target))
      local fresh = dir .. "/fresh.jsonl"
      assert(c:content(file.id, { path = fresh }))
      assert.are_not.equal("600", H.sh("stat -c %a " .. fresh):gsub("%s+", ""))
      c:close()
    end)

    it("refuse an encoding nobody asked for, to a path and to a string alike", function()
      local c = client("gzip")
      local v, err = c:content("file-1")
      assert.is_nil(v)
      is_error(err, "decode")
      assert.are.equal("unexpected_encoding", err.code)
      v, err = c:content("file-1", { path = dir .. "/gz.out" })
      assert.is_nil(v)
      assert.are.equal("unexpected_encoding", err.code)
      assert.is_false(H.exists(dir .. "/gz.out"))
      c:close()
    end)

    it("refuse a body shorter than its Content-Length, leaving nothing", function()
      local c = client("short")
      local _, err = c:content("file-1", { path = dir .. "/short.out" })
      is_error(err, "network")
      assert.is_true(err.retryable)
      assert.are.equal("", H.sh("ls " .. dir .. " | grep short"))
      c:close()
    end)
  end)

  describe("answers", function()
    it("an array, a string or nothing where an object belongs is a decode error", function()
      for _, s in ipairs({ "array", "string", "empty" }) do
        local c = client(s)
        local v, err = c:retrieve("batch_1")
        assert.is_nil(v)
        is_error(err, "decode")
        c:close()
      end
    end)

    it("100,000 levels of nesting are a decode error, not a crash", function()
      local c = client("deep-100")
      local _, err = c:retrieve("batch_1")
      is_error(err, "decode")
      c:close()
    end)

    it("an answer past max_response_bytes is refused as it arrives (200 MB: memory stays flat) #memory", function()
      local script = H.write(dir .. "/huge.lua", [[
        local lbatch = require "lbatch"
        local c = lbatch.new({ api_key = "k", base_url = arg[1], max_retries = 0, timeout = 60 })
        local v, err = c:retrieve("batch_1")
        for l in io.lines("/proc/self/status") do
          local hwm = l:match("^VmHWM:%s+(%d+)")
          if hwm then io.write(tostring(v), " ", err.kind, " ", err.code, " ", hwm, "\n") end
        end
      ]])
      local out = H.sh(("%s %s %s 2>&1"):format(H.lua, script, srv.at("huge-200")))
      local v, kind, code, kb = out:match("(%S+) (%S+) (%S+) (%d+)")
      assert.are.same({ "nil", "decode", "response_too_large" }, { v, kind, code }, out)
      assert.is_true(tonumber(kb) < 150 * 1024, "peak RSS " .. kb .. " kB")
    end)

    it("the cap on answers is an option (max_response_bytes)", function()
      local c = client("huge-2", { max_response_bytes = 1024 * 1024 })
      local _, err = c:retrieve("batch_1")
      assert.are.equal("response_too_large", err.code)
      c:close()
      c = client("huge-2")
      assert.are.equal("completed", assert(c:retrieve("batch_1")).status)
      c:close()
    end)

    it("a huge header block is refused, not kept", function()
      local c = client("huge_headers-2048")
      local v, err = c:list_batches()
      assert.is_nil(v)
      is_error(err)
      c:close()
    end)

    it("NUL bytes and invalid UTF-8 stay inside one line of an error", function()
      local c = client("nul")
      local _, err = c:list_batches()
      is_error(err, "http")
      assert.are.equal("nul", err.code)
      c:close()
      c = client("nul_header")               -- libcurl itself refuses a NUL in a header
      _, err = c:list_batches()
      is_error(err, "network")
      assert.is_false(err.retryable)
      c:close()
    end)

    it("error fields are strings or nil, whatever their JSON type", function()
      local c = client("odd_fields")
      local _, err = c:list_batches()
      is_error(err, "http")
      assert.is_nil(err.code)
      assert.are.equal("5", err.param)
      assert.are.equal("true", err.type)
      assert.is_nil(err.request_id)
      assert.matches("^lbatch: http 400: HTTP 400", tostring(err))
      c:close()
    end)

    it("a redirect is not followed (the key would go with it)", function()
      local c = client("redirect", { max_retries = 2 })
      local _, err = c:retrieve("batch_1")
      is_error(err, "http")
      assert.are.equal(302, err.status)
      assert.are.equal(1, srv.stats()["requests:redirect"])
      c:close()
    end)

    it("only a 2xx answer is a value: 300 and 399 with a batch for a body are errors, 200 and 299 are the batch",
       function()
      for _, status in ipairs({ 200, 299, 300, 399 }) do
        local c = client("status-" .. status)
        local b, err = c:retrieve("batch_1")
        if status >= 200 and status < 300 then
          assert.is_nil(err, status)
          assert.are.equal("completed", b.status)
        else
          assert.is_nil(b, status)
          is_error(err, "http")
          assert.are.equal(status, err.status)
        end
        c:close()
      end
    end)
  end)

  describe("random answers", function()
    -- every operation against random statuses, bytes and JSON shapes:
    -- a value or an error object, never a raise, never the key
    it("never raise, never show the key (300 rounds of every operation)", function()
      local rounds = tonumber(os.getenv("LBATCH_HOSTILE_ROUNDS") or "300")
      local target = H.write(dir .. "/rnd.jsonl", '{"custom_id":"a"}\n')
      for seed = 1, rounds do
        local c = client("random-" .. seed, { max_retries = 0, timeout = 5 })
        local ops = {
          function() return c:retrieve("batch_1") end,
          function() return c:list_batches({ limit = 2 }) end,
          function() return c:list_files() end,
          function() return c:create({ input_file_id = "file-1", endpoint = "/v1/chat/completions" }) end,
          function() return c:cancel("batch_1") end,
          function() return c:file("file-1") end,
          function() return c:delete_file("file-1") end,
          function() return c:content("file-1") end,
          function() return c:content("file-1", { path = dir .. "/rnd.out" }) end,
          function() return c:upload(target) end,
          function()
            for x, err in c:each_batch({ limit = 1 }) do if not x then return nil, err end end
            return true
          end,
        }
        for i, op in ipairs(ops) do
          local ok, v, err = pcall(op)
          assert.is_true(ok, ("seed %d op %d raised: %s"):format(seed, i, tostring(v)))
          if v == nil then
            is_error(err)
            clean_of_key(tostring(err), ("seed %d op %d"):format(seed, i))
          elseif type(v) == "table" then
            each_string(v, function(s) clean_of_key(s, ("seed %d op %d value"):format(seed, i)) end)
          end
        end
        c:close()
      end
      print(("\n  random answers: %d rounds x 11 operations, no raise, no key"):format(rounds))
    end)
  end)

  it("the core's scanners agree with lua-cjson on custom_ids", function()
    local cjson = require "cjson"
    local lines = { '{"custom_id":"a"}', '  {"x":{"custom_id":"no"},"custom_id":"yes"}', '{"custom_id":5}',
                    '{"custom_id":"a\\"b"}', '{"a":[1,{"b":"}"}],"custom_id":"z"}', '{"custom_id":"a","custom_id":"b"}',
                    '[1]', '{', '', '{"custom_id":"中文"}' }
    for _, line in ipairs(lines) do
      local got = core.json_string(line, "custom_id")
      local ok, v = pcall(cjson.decode, line)
      local want = ok and type(v) == "table" and v.custom_id
      if got then assert.are.equal(want, got, line)
      elseif got == nil then assert.is_true(ok and type(v) == "table" and v.custom_id == nil, line) end
    end
  end)
end)
