-- Told, not polling: the emulator's OpenAI-dialect webhooks (checked by
-- the openai SDK's own webhooks.unwrap), waits woken by them through the
-- lua-http adapter, and notices that lie changing nothing.
local H = require "helper"
local lbatch = require "lbatch"
local now = require("lbatch.core").now

local SECRET = "whsec_" .. ("c2VjcmV0IG9mIHRoZSBub3RpZnkgc3BlYyAhIQ==")
local RECEIVER = H.root .. "/emulator/conformance/webhook-receiver.mjs"

local function batches(c, n, lines)
  local path = H.requests(H.tmpdir() .. "/n.jsonl", lines or 1, { url = "/v1/chat/completions", model = "qwen-plus" })
  local f = assert(c:upload(path))
  local ids = {}
  for i = 1, n do ids[i] = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id end
  return ids
end

describe("the emulator's webhooks #conformance", function()
  it("pass the openai SDK's webhooks.unwrap, and are retried while the receiver fails", function()
    if not H.exists(H.root .. "/emulator/conformance/node_modules/openai") then
      pending("npm install in emulator/conformance first")
      return
    end
    local port = H.free_port()
    local log = os.tmpname()
    local pid = H.sh(("setsid node %s %d %s 2 >%s 2>&1 & echo $!"):format(H.q(RECEIVER), port, SECRET, log)):match("%d+")
    for _ = 1, 100 do if (H.read(log) or ""):find("listening") then break end H.sleep(0.05) end
    local emu = H.emulator({ speed = 200, dialect = "openai", tls = false,
                             webhook_url = ("http://127.0.0.1:%d/hook"):format(port), webhook_secret = SECRET })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local ids = batches(c, 3)
    assert(c:cancel(ids[3]))
    local out
    for _ = 1, 200 do
      out = H.read(log) or ""
      local oks = select(2, out:gsub("\nok ", ""))
      if oks >= 3 then break end
      H.sleep(0.05)
    end
    emu.stop()
    H.ok("kill -TERM " .. pid)
    os.remove(log)
    assert.are.equal(2, select(2, out:gsub("\nfail ", "")), out)
    assert.is_nil(out:find("\nbad ", 1, true), out)
    assert.truthy(out:find(" batch.completed " .. ids[1] .. "\n", 1, true), out)
    assert.truthy(out:find(" batch.completed " .. ids[2] .. "\n", 1, true), out)
    assert.truthy(out:find(" batch.cancelled " .. ids[3] .. "\n", 1, true), out)
  end)
end)

describe("notices that lie", function()
  it("a notice for a batch that does not exist, or completed while in_progress, changes nothing", function()
    local emu = H.emulator({ speed = 0.05, dialect = "openai" })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local id = batches(c, 1, 3)[1]
    c:expect_notices()
    local t = c:spawn(function()
      return c:wait(id, { interval = 60, deadline = 1.5 })
    end)
    c:spawn(function()
      c:sleep(0.2)
      assert.is_false(c:notice({ type = "batch.completed", batch_id = "batch_does_not_exist" }))
      assert.is_true(c:notice({ type = "batch.completed", batch_id = id, data = { id = id } }))
      c:notice(id)                     -- again at once: one fetch within HINT_GAP
    end)
    local b, err = t:join()
    emu.stop()
    assert.is_nil(b)
    assert.are.equal("wait_deadline", err.code)
    assert.are_not.equal("completed", err.batch.status)   -- what the service said, not the notice
    assert.are.equal(1, c:watcher().calls)
  end)
end)

describe("waits woken by webhooks through lua-http", function()
  it("see each job's end soon after the emulator's finish, not at their 60 s poll, with about one status call a job", function()
    local ok_http, http_server = pcall(require, "http.server")
    if not ok_http then pending("lua-http is not installed for this Lua") return end
    local cqueues = require "cqueues"
    local n_jobs = 20
    local cq = cqueues.new()
    local c
    local refused = 0
    local server = assert(http_server.listen({ host = "127.0.0.1", port = 0, cq = cq,
      onstream = require("lbatch.lua_http").onstream({ secrets = { SECRET },
        client = setmetatable({}, { __index = function(_, k) return function(_, ...) return c[k](c, ...) end end }),
        on_refused = function() refused = refused + 1 end }) }))
    assert(server:listen())
    local _, _, port = server:localname()
    local emu = H.emulator({ speed = 200, dialect = "openai", tls = false,
                             webhook_url = ("http://127.0.0.1:%d/hook"):format(port), webhook_secret = SECRET })
    c = lbatch.new({ api_key = "k", base_url = emu.base })
    local ids = batches(c, n_jobs, 2)
    c:expect_notices()
    local seen_at, statuses = {}, {}
    for _, id in ipairs(ids) do
      c:spawn(function()
        local b = assert(c:wait(id, { interval = 60 }))
        seen_at[id], statuses[id] = now(), b.status
      end)
    end
    cq:wrap(function()
      local pollable = c:pollable()
      while true do
        local pending_work, failure = c:step()
        if failure then error(failure) end
        if pending_work == 0 then break end
        cqueues.poll(pollable, 0.05)
      end
      server:close()
    end)
    assert(cq:loop(30))
    local _, st = H.json("GET", emu.url .. "/_emulator/stats?finished=1")
    local t_here = now()
    emu.stop()
    assert.are.equal(0, refused)
    local calls = c:watcher().calls
    -- one retrieve a job at most; ends told together share a list page
    assert.is_true(calls <= n_jobs + 2, ("%d status calls for %d jobs"):format(calls, n_jobs))
    for _, id in ipairs(ids) do
      assert.are.equal("completed", statuses[id])
      local seen = st.now - (t_here - seen_at[id])
      -- (not woken, a wait would see it after its interval's 60 s: a slow machine's seconds still pass)
      assert.is_true(seen - st.finished[id] < 20, ("%s seen %.2f s after its end"):format(id, seen - st.finished[id]))
    end
  end)
end)

describe("a pipeline told, not polling", function()
  local ok_http = pcall(require, "http.server")

  -- a pipeline of `shards` shards on an emulator that tells it of each end
  -- (its webhooks in the openai dialect, the batches' callback in the
  -- dashscope one); poll_interval 300 s: without the notices it would poll
  -- each shard after 300 s, with them it is done in a few
  local function told(dialect)
    if not ok_http then pending("lua-http is not installed for this Lua") return end
    local port = H.free_port()
    local hook = ("http://127.0.0.1:%d/hook"):format(port)
    local emu = H.emulator({ speed = 200, dialect = dialect, tls = false, rate_limits = false,
      webhook_url = dialect == "openai" and hook or nil, webhook_secret = SECRET })
    local c = lbatch.new({ api_key = "k", base_url = emu.base, region = dialect == "openai" and "openai" or "cn" })
    local dir = H.tmpdir()
    local reqs = {}
    for i = 1, 12 do
      reqs[i] = { custom_id = "q" .. i, body = { model = "qwen-plus", messages = { { role = "user", content = "q" .. i } } } }
    end
    local signed, refused, listening = {}, 0, false
    local t0 = now()
    local report, err = require("lbatch.pipeline").run({ client = c, requests = reqs, dir = dir, max_lines = 2,
      endpoint = "/v1/chat/completions", poll_interval = 300, max_in_flight = 6,
      notify = { url = hook, secret = SECRET, listen = "127.0.0.1:" .. port,
                 on_listen = function() listening = true end,
                 on_notice = function(n) signed[#signed + 1] = n.signed end,
                 on_refused = function() refused = refused + 1 end },
    })
    local wall = now() - t0
    local _, page = H.json("GET", emu.base .. "/batches?limit=100", { key = "k" })
    emu.stop()
    assert.is_true(listening)
    assert(report, tostring(err))
    assert.are.equal(6, #report.shards)
    local ok = 0
    for rec in report.results:each() do if rec.ok then ok = ok + 1 end end
    assert.are.equal(12, ok)
    assert.is_true(wall < 120, ("%.1f s: the waits were not woken"):format(wall))   -- (not woken: 300 s)
    local calls = c:watcher().calls
    assert.is_true(calls <= 6 + 2, ("%d status calls for 6 shards"):format(calls))
    assert.are.equal(0, refused)
    assert.is_true(#signed >= 6, #signed .. " notices")
    for _, n in ipairs(signed) do assert.are.equal(dialect == "openai", n) end
    for _, b in ipairs(page.data) do
      local cb = type(b.metadata) == "table" and b.metadata.ds_batch_finish_callback or nil
      assert.are.equal(dialect == "dashscope" and hook or nil, cb)
    end
    H.ok("rm -rf " .. dir)
  end

  it("by the emulator's signed webhooks (openai dialect), through its own lua-http listener", function()
    told("openai")
  end)

  it("by DashScope's callback, the URL set on every batch it creates", function()
    told("dashscope")
  end)

  it("a forged callback saying completed while the batch runs changes nothing", function()
    if not ok_http then pending("lua-http is not installed for this Lua") return end
    local port = H.free_port()
    local hook = ("http://127.0.0.1:%d/hook"):format(port)
    local emu = H.emulator({ speed = 20, tls = false, rate_limits = false })
    local c = lbatch.new({ api_key = "k", base_url = emu.base })
    local dir = H.tmpdir()
    local reqs = { { custom_id = "a", body = { model = "qwen-plus", messages = { { role = "user", content = "a" } } } },
                   { custom_id = "b", body = { model = "qwen-plus", messages = { { role = "user", content = "b" } } } } }
    local forged = dir .. "/forged"
    local report = assert(require("lbatch.pipeline").run({ client = c, requests = reqs, dir = dir, poll_interval = 30,
      endpoint = "/v1/chat/completions", metadata = { emulator_line_seconds = "20" },   -- about 2.8 s
      notify = { url = hook, listen = "127.0.0.1:" .. port },
      on_step = function(step, sh)
        -- DashScope's callback is unsigned: anyone can post one (from another
        -- process, in the background: this one serves it)
        if step == "waiting" then
          H.ok(("curl -s --max-time 10 -o /dev/null -w '%%{http_code}' -X POST -d '{\"id\":\"%s\","
            .. "\"status\":\"completed\",\"output_file_id\":\"file-forged\"}' %s >%s 2>&1 &"):format(
            sh.batch_id, hook, forged))
        end
      end }))
    local _, st = H.json("GET", emu.url .. "/_emulator/stats?finished=1")
    emu.stop()
    local sh = report.shards[1]
    assert.are.equal("200", H.read(forged))  -- taken as a hint...
    assert.are.equal("completed", sh.status) -- ...and the batch's real end waited for
    assert.is_truthy(st.finished[sh.batch_id])
    local ok = 0
    for rec in report.results:each() do if rec.ok then ok = ok + 1 end end
    assert.are.equal(2, ok)
    assert.are_not.equal("file-forged", sh.output_file_id)
    assert.is_true(c:watcher().calls <= 3, c:watcher().calls .. " status calls")
    H.ok("rm -rf " .. dir)
  end)

  it("refuses a notify.url that is not http(s) before any request", function()
    local c = lbatch.new({ api_key = "k", base_url = "http://127.0.0.1:9/v1" })
    local r, err = require("lbatch.pipeline").run({ client = c, requests = { { custom_id = "a", body = {} } },
      dir = H.tmpdir(), notify = { url = "ftp://x/hook" } })
    assert.is_nil(r)
    assert.are.equal("invalid", err.kind)
    assert.truthy(err.message:find("notify.url", 1, true))
  end)
end)
