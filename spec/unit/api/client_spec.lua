-- lbatch against the emulator over real HTTP: every operation, every error
-- kind, retries, no duplicate batch, many tasks, step(), memory.
local H = require "helper"
local lbatch = require "lbatch"
local cjson = require "cjson"

local KEY = "sk-spec-secret-0123456789abcdef"

local function fault(emu, rule)
  local status = H.json("POST", emu.url .. "/_emulator/faults", { json = rule })
  assert.are.equal(200, status)
end

local function stats(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats")
  return type(s.routes) == "table" and s.routes or {}   -- none yet: JSON null
end

local function chat_file(dir, name, n)
  return H.requests(dir .. "/" .. name, n, { url = "/v1/chat/completions", model = "qwen-plus" })
end

describe("lbatch client", function()
  local emu, dir, client
  setup(function()
    emu = H.emulator({ speed = 200, api_key = KEY, rate_limits = false })
    dir = H.tmpdir()
  end)
  before_each(function()
    H.http("DELETE", emu.url .. "/_emulator/faults")
    client = lbatch.new({ api_key = KEY, base_url = emu.base, max_retries = 2 })
  end)
  after_each(function() client:close() end)
  teardown(function() emu.stop() end)

  describe("operations", function()
    it("uploads, creates, retrieves, downloads, lists and deletes", function()
      local path = chat_file(dir, "ops.jsonl", 3)
      local f = assert(client:upload(path))
      assert.matches("^file%-batch%-", f.id)
      assert.are.equal(#H.read(path), f.bytes)
      assert.are.equal(math.type and "integer" or "number", math.type and math.type(f.bytes) or type(f.bytes))
      local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                       metadata = { ds_name = "ops" } }))
      assert.are.equal("validating", b.status)
      assert.are.equal("24h", b.completion_window)
      assert.is_nil(b.output_file_id)  -- JSON null reads as nil
      repeat client:sleep(0.05); b = assert(client:retrieve(b.id)) until b.status == "completed"
      local text = assert(client:content(b.output_file_id))
      local n = 0
      for line in text:gmatch("[^\n]+") do
        n = n + 1
        assert.are.equal(200, cjson.decode(line).response.status_code)
      end
      assert.are.equal(3, n)
      local out = dir .. "/ops-out.jsonl"
      assert.are.equal(out, client:content(b.output_file_id, { path = out }))
      assert.are.equal(text, H.read(out))
      local page = assert(client:list_batches({ limit = 1 }))
      assert.are.equal(b.id, page.data[1].id)
      local files = assert(client:list_files({ limit = 100 }))
      assert.is_true(#files.data >= 2)
      assert.are.equal(f.id, assert(client:file(f.id)).id)
      local del = assert(client:delete_file(f.id))
      assert.is_true(del.deleted)
      -- the client asks again for fresh_window seconds (30) when an id it made a moment ago is "not
      -- there", but not one it deleted itself: its 404 comes at once
      local t0 = H.now()
      local none, err = client:file(f.id)
      assert.is_nil(none)
      assert.are.equal(404, err.status)
      assert.is_true(H.now() - t0 < 15, "a deleted file's 404 was asked again over fresh_window")
    end)

    it("lists batches as list, the design's name, with list_batches' arguments and answer", function()
      local f = assert(client:upload(chat_file(dir, "list.jsonl", 1)))
      local made = {}
      for i = 1, 3 do made[i] = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id end
      local page = assert(client:list({ limit = 2, input_file_ids = { f.id } }))
      assert.are.same({ made[3], made[2] }, { page.data[1].id, page.data[2].id })
      assert.is_true(page.has_more)
      local nxt = assert(client:list({ limit = 2, after = page.last_id, input_file_ids = { f.id } }))
      assert.are.same({ made[1] }, { nxt.data[1].id })
      -- the same page by the other name (its batches' statuses may have moved on meanwhile)
      local again = assert(client:list_batches({ limit = 2, input_file_ids = { f.id } }))
      assert.are.same({ page.data[1].id, page.data[2].id, #page.data, page.has_more, page.last_id },
        { again.data[1].id, again.data[2].id, #again.data, again.has_more, again.last_id })
      local p2, response = client:list({ limit = 1 }, { with_response = true })
      assert.is_table(p2)
      assert.are.equal(200, response.status)
      assert.has_error(function() client:list(5) end, "lbatch.list: params must be a table (got number)")
    end)

    it("cancels a batch", function()
      local f = assert(client:upload(chat_file(dir, "cancel.jsonl", 5)))
      local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                       metadata = { emulator_line_seconds = "1000" } }))
      local c = assert(client:cancel(b.id))
      assert.are.equal("cancelling", c.status)
      repeat client:sleep(0.05); c = assert(client:retrieve(b.id)) until c.status == "cancelled"
      local again, err = client:cancel(b.id)
      assert.is_nil(again)
      assert.are.equal(409, err.status)
    end)

    it("iterates every batch across pages, and data is always a table", function()
      local f = assert(client:upload(chat_file(dir, "iter.jsonl", 1)))
      local mine = {}
      for i = 1, 5 do
        mine[assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id] = i
      end
      local seen, count = {}, 0
      for b, err in client:each_batch({ limit = 2, input_file_ids = { f.id } }) do
        assert.is_truthy(b, tostring(err))
        assert.is_nil(seen[b.id])
        seen[b.id] = true
        count = count + 1
      end
      assert.are.equal(5, count)
      for id in pairs(mine) do assert.is_true(seen[id]) end
      local empty = assert(client:list_batches({ status = "expired", input_file_ids = { f.id } }))
      assert.are.same({}, empty.data)   -- the dashscope dialect sends null
    end)
  end)

  describe("errors", function()
    it("401 with a wrong key, and no key in any message", function()
      local other = lbatch.new({ api_key = "sk-wrong-key-that-must-not-leak", base_url = emu.base, max_retries = 0 })
      local v, err = other:list_batches()
      other:close()
      assert.is_nil(v)
      assert.are.same({ "http", 401, false }, { err.kind, err.status, err.retryable })
      assert.is_nil(tostring(err):find("sk-wrong", 1, true))
      -- a server that echoes the key: it is scrubbed
      fault(emu, { path = "^/v1/batches$", status = 400, message = "bad request for key " .. KEY })
      err = select(2, client:list_batches())
      assert.are.equal(400, err.status)
      assert.is_nil(err.message:find(KEY, 1, true))
      assert.is_nil(tostring(err):find(KEY, 1, true))
    end)

    it("404 as an error table with a one-line __tostring", function()
      local v, err = client:retrieve("batch_missing")
      assert.is_nil(v)
      assert.are.same({ "http", 404, "batch_not_found", "batch_id", false },
                      { err.kind, err.status, err.code, err.param, err.retryable })
      assert.is_string(err.request_id)
      local s = tostring(err)
      assert.matches("^lbatch: http 404 batch_not_found: No such batch", s)
      assert.is_nil(s:find("\n"))
      assert.is_true(lbatch.is_error(err))
    end)

    it("429 with Retry-After: waited out, or surfaced past the cap", function()
      fault(emu, { path = "^/v1/batches$", status = 429, retry_after = 1 })
      local t0 = H.now()
      assert.is_truthy(client:list_batches())
      assert.is_true(H.now() - t0 >= 0.9)
      fault(emu, { path = "^/v1/batches$", status = 429, retry_after_ms = 200 })
      t0 = H.now()
      assert.is_truthy(client:list_batches())
      assert.is_true(H.now() - t0 >= 0.18)
      fault(emu, { path = "^/v1/batches$", status = 429, retry_after = 3600 })
      t0 = H.now()
      local v, err = client:list_batches()
      assert.is_nil(v)
      assert.are.same({ "http", 429, true }, { err.kind, err.status, err.retryable })
      assert.is_true(H.now() - t0 < 30)     -- not waited (a wait would be retry_after_cap, 60 s; under load: not 1 s)
    end)

    it("500: retried until it succeeds, or given up after max_retries", function()
      local before = stats(emu)["GET /batches"] or 0
      fault(emu, { path = "^/v1/batches$", status = 500, times = 2 })
      assert.is_truthy(client:list_batches())
      assert.are.equal(before + 3, stats(emu)["GET /batches"])
      fault(emu, { path = "^/v1/batches$", status = 503, times = 3 })
      local v, err = client:list_batches()
      assert.is_nil(v)
      assert.are.same({ "http", 503, true }, { err.kind, err.status, err.retryable })
      assert.are.equal(before + 6, stats(emu)["GET /batches"])
    end)

    it("a dropped connection is a retryable network error", function()
      local once = lbatch.new({ api_key = KEY, base_url = emu.base, max_retries = 0 })
      fault(emu, { path = "^/v1/batches$", mode = "close" })
      local v, err = once:list_batches()
      assert.is_nil(v)
      assert.are.same({ "network", true }, { err.kind, err.retryable })
      fault(emu, { path = "^/v1/batches$", mode = "close" })
      assert.is_truthy(client:list_batches())    -- with retries it recovers
      once:close()
    end)

    it("invalid JSON is a decode error; a stall past the timeout is a timeout", function()
      local once = lbatch.new({ api_key = KEY, base_url = emu.base, max_retries = 0, timeout = 0.3 })
      fault(emu, { path = "^/v1/batches$", mode = "invalid_json" })
      local v, err = once:list_batches()
      assert.is_nil(v)
      assert.are.same({ "decode", 200 }, { err.kind, err.status })
      fault(emu, { path = "^/v1/batches$", delay = 2 })
      v, err = once:list_batches()
      assert.is_nil(v)
      assert.are.same({ "timeout", true }, { err.kind, err.retryable })
      once:close()
    end)

    it("a network failure names the kind", function()
      local dead = lbatch.new({ api_key = KEY, base_url = "http://127.0.0.1:9/v1", max_retries = 0 })
      local v, err = dead:list_batches()
      dead:close()
      assert.is_nil(v)
      assert.are.equal("network", err.kind)
      assert.matches("curl_7", err.code)
      -- it names the provider and the host in use
      assert.are.same({ "dashscope", "127.0.0.1:9" }, { err.provider, err.host })
      assert.matches("(provider dashscope, host 127.0.0.1:9)", tostring(err), 1, true)
      local oa = lbatch.new({ api_key = KEY, provider = "openai", base_url = "http://127.0.0.1:9/v1", max_retries = 0 })
      local _, oerr = oa:list()
      oa:close()
      assert.matches("(provider openai, host 127.0.0.1:9)", tostring(oerr), 1, true)
      assert.is_nil(tostring(oerr):find(KEY, 1, true))
    end)

    it("a download cut off half way leaves no file behind", function()
      local openai = H.emulator({ speed = 200, dialect = "openai" })
      local c = lbatch.new({ api_key = "k", base_url = openai.base, max_retries = 0 })
      local path = H.requests(dir .. "/cut.jsonl", 200)
      local f = assert(c:upload(path))
      fault(openai, { path = "/content$", mode = "truncate" })
      local target = dir .. "/cut-download/out.jsonl"
      H.ok("mkdir -p " .. dir .. "/cut-download")
      local v, err = c:content(f.id, { path = target })
      assert.is_nil(v)
      assert.are.same({ "network", true }, { err.kind, err.retryable })
      assert.is_false(H.exists(target))
      assert.are.equal("", H.sh("ls -A " .. dir .. "/cut-download"))
      -- and a retried download completes
      fault(openai, { path = "/content$", mode = "truncate" })
      local c2 = lbatch.new({ api_key = "k", base_url = openai.base, max_retries = 1 })
      assert.are.equal(target, c2:content(f.id, { path = target }))
      assert.are.equal(H.read(path), H.read(target))
      c:close(); c2:close()
      openai.stop()
    end)

    it("raises on wrong argument types", function()
      assert.has_error(function() client:retrieve(42) end)
      assert.has_error(function() client:create("file-1") end)
      assert.has_error(function() client:create({ input_file_id = 1, endpoint = "/v1/chat/completions" }) end)
      assert.has_error(function() client:upload(nil) end)
      assert.has_error(function() client:content("f", { path = 3 }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, timeout = "10" }) end)
      assert.has_error(function() lbatch.new({ api_key = KEY, region = "mars" }) end)
      local v, err = client:upload(dir .. "/does-not-exist.jsonl")
      assert.is_nil(v)
      assert.are.equal("io", err.kind)
    end)
  end)

  describe("upload", function()
    it("uploads again when the failed attempt stored nothing, and once only", function()
      local before = stats(emu)["POST /files"] or 0
      fault(emu, { method = "POST", path = "^/v1/files$", status = 502 })
      local f = assert(client:upload(chat_file(dir, "again.jsonl", 2)))
      assert.are.equal(before + 2, stats(emu)["POST /files"])
      local same = 0
      for x in client:each_file() do if x.filename == "again.jsonl" then same = same + 1 end end
      assert.are.equal(1, same)
      assert.are.equal(f.id, assert(client:file(f.id)).id)
    end)
  end)

  describe("create", function()
    it("leaves no duplicate batch when the response to a create is lost", function()
      local f = assert(client:upload(chat_file(dir, "dup.jsonl", 2)))
      local before = stats(emu)["POST /batches"] or 0
      -- the emulator creates the batch, then drops the connection
      fault(emu, { method = "POST", path = "^/v1/batches$", mode = "close" })
      local b, err = client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                     metadata = { run = "dup" } })
      assert.is_truthy(b, tostring(err))
      assert.are.equal(before + 1, stats(emu)["POST /batches"])
      local page = assert(client:list_batches({ input_file_ids = { f.id } }))
      assert.are.equal(1, #page.data)
      assert.are.equal(b.id, page.data[1].id)
    end)

    it("sends again when the failed attempt created nothing", function()
      local f = assert(client:upload(chat_file(dir, "dup2.jsonl", 2)))
      local before = stats(emu)["POST /batches"] or 0
      fault(emu, { method = "POST", path = "^/v1/batches$", status = 502 })
      local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
      assert.are.equal(before + 2, stats(emu)["POST /batches"])
      local page = assert(client:list_batches({ input_file_ids = { f.id } }))
      assert.are.equal(1, #page.data)
      assert.are.equal(b.id, page.data[1].id)
    end)
  end)

  describe("tasks", function()
    it("runs 100 tasks at once on one client", function()
      local f = assert(client:upload(chat_file(dir, "many.jsonl", 2)))
      local tasks, max_in_flight = {}, 0
      for i = 1, 100 do
        tasks[i] = client:spawn(function(n)
          local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                           metadata = { n = tostring(n) } }))
          repeat client:sleep(0.05); b = assert(client:retrieve(b.id)) until b.status == "completed"
          return b.id, b.metadata.n
        end, i)
      end
      local t0 = H.now()
      client:spawn(function()
        while true do
          local pending = client.scheduler.loop.ctl:pending()
          if pending > max_in_flight then max_in_flight = pending end
          local done = 0
          for _, t in ipairs(tasks) do if t:done() then done = done + 1 end end
          if done == #tasks then return end
          client:sleep(0.01)
        end
      end)
      assert.is_true(client:run())
      local ids = {}
      for i, t in ipairs(tasks) do
        local id, n = t:join()
        assert.are.equal(tostring(i), n)
        ids[id] = true
      end
      local distinct = 0
      for _ in pairs(ids) do distinct = distinct + 1 end
      assert.are.equal(100, distinct)
      assert.is_true(max_in_flight >= 16, "transfers overlapped: " .. max_in_flight)
      assert.is_true(H.now() - t0 < 30)
    end)

    it("returns a task's error with its traceback from run()", function()
      client:spawn(function() local x = nil; return x.field end)
      local ok, err = client:run()
      assert.is_nil(ok)
      assert.are.same({ "task", false }, { err.kind, err.retryable })
      assert.matches("attempt to index", err.message)
      assert.matches("stack traceback", err.traceback)
      assert.matches("^lbatch: task task_failed: .*attempt to index", tostring(err))
    end)

    it("drives a whole flow with step() without ever blocking", function()
      local path = chat_file(dir, "step.jsonl", 3)
      local out = dir .. "/step-out.jsonl"
      -- a step that blocked would take the task's sleep (0.6 s) or the download the server holds for 1 s:
      -- the bound below (0.3 s) is far from both, and from what a loaded machine adds to a step
      fault(emu, { path = "/content$", delay = 1 })
      local task = client:spawn(function()
        local f = assert(client:upload(path))
        local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
        repeat client:sleep(0.6); b = assert(client:retrieve(b.id)) until b.status == "completed"
        return assert(client:content(b.output_file_id, { path = out }))
      end)
      local steps, worst = 0, 0
      local deadline = H.now() + 30
      while not task:done() and H.now() < deadline do
        local t0 = H.now()
        local pending = client:step()
        local dt = H.now() - t0
        if dt > worst then worst = dt end
        steps = steps + 1
        if not task:done() then assert.is_true(pending >= 1) end
        local ms = client:timeout()
        assert.is_number(ms)
        H.sleep(0.001)
      end
      assert.is_true(task:done())
      assert.are.equal(out, task:join())
      assert.is_true(steps > 10)
      assert.is_true(worst < 0.3, "slowest step took " .. worst .. " s")
      assert.are.equal(0, (client:step()))
      assert.is_number(client:pollfd())
    end)

    it("starts queued transfers a few per budgeted step, never more than max_connections", function()
      local core = require "lbatch.core"
      -- (on HTTP/1.1 at most max_connections at once; on HTTP/2, the TLS
      -- pass, once a connection has multiplexed, max_connections x
      -- max_streams: 16 here)
      local ctl = core.new({ max_connections = 8, max_streams = 2 })
      local cap = emu.tls and 16 or 8
      local ids = {}
      for i = 1, 40 do ids[i] = ctl:add({ url = emu.url .. "/_emulator/stats", cainfo = emu.tls }) end
      assert.are.same({ 40, 40, 0 }, { ctl:pending() })
      assert.are.equal(0, ctl:timeout())            -- transfers wait to start
      assert.is_true(ctl:cancel(ids[40]))           -- a queued one can go
      ctl:step(0, 0.1)                              -- with a budget: two start
      local _, queued, active = ctl:pending()
      assert.are.equal(37, queued)
      assert.is_true(active <= 2)
      local seen, steps, peak = {}, 1, 0
      local deadline = H.now() + 20
      while ctl:pending() > 0 and H.now() < deadline do
        ctl:step(0, 0.1)
        steps = steps + 1
        local _, _, a = ctl:pending()
        peak = math.max(peak, a)
        for id, res in ctl.done, ctl do
          assert.are.equal(200, res.status)
          seen[#seen + 1] = id
        end
        H.sleep(0.001)
      end
      assert.are.equal(39, #seen)
      assert.is_true(peak <= cap, "active at once: " .. peak)
      assert.is_true(steps >= 20, "steps: " .. steps)
      -- without a budget (run()), a step starts all that fit: max_connections
      -- on HTTP/1.1; on HTTP/2 (the TLS pass) max_connections x max_streams
      for _ = 1, 20 do ctl:add({ url = emu.url .. "/_emulator/stats", cainfo = emu.tls }) end
      ctl:step(0)
      local n, q = ctl:pending()
      assert.are.same({ 20, 20 - cap }, { n, q })
      ctl:close()
    end)

    it("spreads a task's long work over steps with pause()", function()
      local n = 0
      local task = client:spawn(function()
        for _ = 1, 20000 do
          n = n + 1
          for _ = 1, 50 do n = n + 0 end           -- some work per item
          client:pause()
        end
        return n
      end)
      -- Each step's length is read as the process's CPU time (os.clock), not
      -- the wall clock: a busy machine may preempt any step for many
      -- milliseconds, and the wall-clock budget is judged in the #timing
      -- specs, alone on the machine. Work that pause() did not spread would
      -- show here as a step of the whole run's CPU time.
      -- (A step over the budget says what else it held: the heap before and
      -- after it, which a collection of earlier specs' garbage would show,
      -- and its wall time beside its CPU time.)
      local steps, worst, seen = 0, 0, ""
      while not task:done() do
        local k0, t0, c0 = collectgarbage("count"), H.now(), os.clock()
        client:step(0.2)
        local c = os.clock() - c0
        if c > worst then
          worst = c
          seen = ("step %d: %.1f ms wall, heap %.0f KB to %.0f KB"):format(steps + 1, (H.now() - t0) * 1000, k0,
            collectgarbage("count"))
        end
        steps = steps + 1
        if not task:done() then
          assert.are.equal(0, client:timeout())     -- more to do at once
        end
      end
      assert.are.equal(20000, task:join())
      assert.is_true(steps > 3, "steps: " .. steps)
      assert.is_true(worst < 0.005, ("the longest step took %.1f ms of CPU (%s)"):format(worst * 1000, seen))
      -- under run() the same work goes through in one go
      local ran = client:spawn(function() for _ = 1, 1000 do client:pause() end return true end)
      assert.is_true(client:run())
      assert.is_true(ran:join())
    end)

    it("blocks outside tasks while still driving the tasks", function()
      local ticks = 0
      client:spawn(function()
        for _ = 1, 5 do client:sleep(0.01); ticks = ticks + 1 end
      end)
      assert.is_truthy(client:list_batches())     -- blocking call
      client:sleep(0.1)                   -- blocking sleep
      assert.are.equal(5, ticks)
    end)
  end)

  describe("progress", function()
    it("reports an upload's and a download's bytes from the loop, ending at the whole size", function()
      local openai = H.emulator({ speed = 200, dialect = "openai" })
      local c = lbatch.new({ api_key = "k", base_url = openai.base, max_connections = 4 })
      local big = dir .. "/progress.bin"
      H.ok("head -c 30000000 /dev/urandom > " .. big)
      local ups, downs = {}, {}
      local f = assert(c:upload(big, nil, { on_progress = function(done, total) ups[#ups + 1] = { done, total } end }))
      local out = dir .. "/progress.out"
      assert(c:content(f.id, { path = out, on_progress = function(done, total) downs[#downs + 1] = { done, total } end }))
      c:close()
      openai.stop()
      for _, seen in ipairs({ ups, downs }) do
        assert.is_true(#seen >= 2, "calls: " .. #seen)
        for i, p in ipairs(seen) do
          assert.is_true(p[2] == 30000000 or (seen == downs and p[2] == nil))   -- nil: no headers yet
          if i > 1 then assert.is_true(p[1] >= seen[i - 1][1]) end
        end
        assert.are.same({ 30000000, 30000000 }, seen[#seen])    -- and the last call says done
      end
      os.remove(big) os.remove(out)
    end)
  end)

  describe("memory", function()
    it("uploads and downloads 200 MB with under 20 MB more peak RSS #memory", function()
      local openai = H.emulator({ speed = 200, dialect = "openai" })
      local big = dir .. "/big.bin"
      H.ok("head -c 200000000 /dev/urandom > " .. big)
      local script = H.write(dir .. "/mem.lua", [[
        local lbatch = require "lbatch"
        local function hwm()
          for l in io.lines("/proc/self/status") do
            local v = l:match("^VmHWM:%s+(%d+)")
            if v then return tonumber(v) end
          end
        end
        local c = lbatch.new({ api_key = "k", base_url = arg[1], timeout = 120 })
        assert(c:list_files({ limit = 1 }))          -- load everything once
        local base = hwm()
        local f = assert(c:upload(arg[2]))
        local got = assert(c:content(f.id, { path = arg[3] }))
        io.write(base, " ", hwm(), " ", f.bytes, "\n")
      ]])
      local out = H.sh(H.lua .. " " .. script .. " " .. openai.base .. " " .. big .. " " .. dir .. "/big.out 2>&1")
      openai.stop()
      local base, peak, bytes = out:match("(%d+) (%d+) (%d+)")
      assert.is_truthy(base, out)
      assert.are.equal(200000000, tonumber(bytes))
      assert.are.equal(H.sh("cmp " .. big .. " " .. dir .. "/big.out && echo same"), "same\n")
      local grew_mb = (tonumber(peak) - tonumber(base)) / 1024
      os.remove(big); os.remove(dir .. "/big.out")
      assert.is_true(grew_mb < 20, ("peak RSS grew by %.1f MB"):format(grew_mb))
    end)
  end)
end)

describe("emulator under lbatch", function()
  it("rate-limits like the service, with Retry-After (dashscope default)", function()
    -- (the limit counts over a rolling minute of real time: 101 calls in a
    -- row meet it however slow the machine, short of a minute a call)
    local emu = H.emulator({ speed = 1 })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 0 })
    local err, calls
    local t0 = H.now()
    for i = 1, 101 do
      local page
      page, err = c:list_batches({ limit = 1 })
      calls = i
      if not page then break end
    end
    local elapsed = H.now() - t0
    c:close()
    emu.stop()
    assert.is_truthy(err)
    assert.are.same({ "http", 429, "rate_limit_exceeded", true, 101 },
      { err.kind, err.status, err.code, err.retryable, calls })
    -- Retry-After: when the first call leaves the rolling minute
    assert.is_true(err.retry_after >= 60 - elapsed - 1 and err.retry_after <= 60,
      ("Retry-After %s, %.1f s after the first call"):format(err.retry_after, elapsed))
  end)

  it("runs 1,000 batches at once without stalling", function()
    local emu = H.emulator({ speed = 1000, rate_limits = false })
    local dir = H.tmpdir()
    local c = lbatch.new({ api_key = "k", base_url = emu.base, max_connections = 32 })
    local f = assert(c:upload(H.requests(dir .. "/k.jsonl", 10, { url = "/v1/chat/completions", model = "qwen-plus" })))
    -- each batch 10 s (10 lines of 1,000 service seconds at speed 1000):
    -- hundreds still run together while the last are made, even where a
    -- busy machine makes the creates slow (AddressSanitizer beside 7 jobs)
    for _ = 1, 1000 do
      c:spawn(function()
        assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                          metadata = { emulator_line_seconds = "1000" } }))
      end)
    end
    assert(c:run())
    local _, st = H.json("GET", emu.url .. "/_emulator/stats")
    assert.is_true(st.running_peak > 100, "running at once: " .. st.running_peak)
    -- the server answers promptly while they run
    local worst = 0
    for _ = 1, 20 do
      local t0 = H.now()
      assert.are.equal(200, (H.json("GET", emu.base .. "/files?limit=1")))
      worst = math.max(worst, H.now() - t0)
    end
    -- (a stall, not a slow machine: up to 8 spec files share 2 cores)
    assert.is_true(worst < 5, "slowest answer " .. worst .. " s")
    local done, deadline = 0, H.now() + 120
    while done < 1000 and H.now() < deadline do
      done = 0
      for b in c:each_batch({ limit = 100, status = "completed" }) do
        assert.is_truthy(b)
        done = done + 1
      end
      if done < 1000 then H.sleep(0.1) end
    end
    c:close()
    emu.stop()
    assert.are.equal(1000, done)
  end)
end)

describe("client:wait's options", function()
  it("refuses a poll interval of 0 or less and a negative stuck_after before any request; takes stuck_after = 0",
    function()
      local c = lbatch.new({ api_key = KEY, base_url = "http://127.0.0.1:9/v1", max_retries = 0 })
      for _, o in ipairs({ { interval = 0 }, { max_interval = 0 }, { interval = -1 } }) do
        local ok, msg = pcall(c.wait, c, "batch_x", o)
        assert.is_false(ok)
        assert.matches("opts.interval and opts.max_interval must be > 0", msg, 1, true)
      end
      local ok, msg = pcall(c.wait, c, "batch_x", { stuck_after = -1 })
      assert.is_false(ok)
      assert.matches("opts.stuck_after must be a number >= 0", msg, 1, true)
      -- 0 is in range: the wait goes on to its first poll, which finds no server
      local b, err = c:wait("batch_x", { stuck_after = 0, interval = 0.01 })
      assert.is_nil(b)
      assert.are.equal("network", err.kind)
      c:close()
    end)
end)
