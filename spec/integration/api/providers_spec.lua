-- Every provider's lifecycle in lbatch against the emulator in its dialect
-- (emulator/run --dialect PROVIDER): upload, create, wait, list, cancel,
-- content, delete, each answer in the one shape; and jobs on three
-- providers at once from one scheduler.
local H = require "helper"
local lbatch = require "lbatch"
local service = require "lbatch.impl.api.service"

local KEY = "prov-key-0123456789abcdef"
local NAMES = { "azure", "groq", "together", "siliconflow", "zhipu", "moonshot", "cerebras", "novita", "litellm" }

-- a client of `name` on the emulator `emu`
local function client(name, emu, extra)
  local p = service.PROVIDERS[name]
  local o = { provider = name, api_key = KEY, base_url = name == "azure" and emu.url or (emu.url .. p.prefix),
              fresh_window = 0 }
  for k, v in pairs(extra or {}) do o[k] = v end
  return assert(lbatch.new(o))
end

local function url_of(name)
  return service.PROFILES[service.PROVIDERS[name].limits].chat_url or "/v1/chat/completions"
end

describe("the emulator's dialects", function()
  it("emulator/run's usage line names every provider, and each is a --dialect it takes", function()
    local usage = H.sh(H.q(H.root .. "/emulator/run") .. " --bogus 2>&1")
    local line = usage:match("%-%-dialect ([%w|%s]+)%]"):gsub("%s", "")
    local listed = {}
    for d in line:gmatch("[^|]+") do listed[d] = true end
    for name in pairs(service.PROVIDERS) do assert.is_true(listed[name], name .. " is not in: " .. usage) end
    local bad = H.sh(H.q(H.root .. "/emulator/run") .. " --dialect nope --port 1 2>&1")
    for name in pairs(service.PROVIDERS) do assert.matches(name, bad, 1, true) end
  end)
end)

describe("each provider's lifecycle on the emulator in its dialect", function()
  for _, name in ipairs(NAMES) do
    it(name .. ": upload, create, wait, list, cancel, content, delete", function()
      local emu = H.emulator({ dialect = name, api_key = KEY, speed = 200 })
      local ok, why = pcall(function()
        local c = client(name, emu)
        local dir = H.tmpdir()
        local url = url_of(name)
        local path = H.requests(dir .. "/in.jsonl", 3, { url = url, model = "m-1" })
        local f = assert(c:upload(path))
        assert.is_string(f.id)
        assert.are.equal(service.PROVIDERS[name].purpose, f.purpose)
        local b = assert(c:create({ input_file_id = f.id, endpoint = url }))
        assert.is_string(b.id)
        assert.is_truthy(service.FINAL[b.status] or b.status == "validating" or b.status == "in_progress", b.status)
        if math.type then assert.are.equal("integer", math.type(b.created_at)) end
        local done = assert(c:wait(b.id, { interval = 0.05, max_interval = 0.2, deadline = 60 }))
        assert.are.equal("completed", done.status)
        assert.is_table(done.request_counts)
        assert.is_string(done.output_file_id)
        local out = assert(c:content(done.output_file_id))
        local n = select(2, out:gsub("\n", ""))
        assert.are.equal(3, n)
        local page = assert(c:list_batches({ limit = 10 }))
        local seen = false
        for _, x in ipairs(page.data) do if x.id == b.id then seen = x end end
        assert.is_table(seen)
        assert.are.equal("completed", seen.status)
        -- cancel one that runs
        local f2 = assert(c:upload(H.requests(dir .. "/in2.jsonl", 3, { url = url, model = "m-1" })))
        local b2 = assert(c:create({ input_file_id = f2.id, endpoint = url }))
        local cb = assert(c:cancel(b2.id))
        assert.is_truthy(cb.status == "cancelling" or cb.status == "cancelled" or cb.status == "completed", cb.status)
        local gone = assert(c:delete_file(f.id))
        assert.is_true(gone.deleted)
        if name == "azure" then            -- the legacy API: /openai/... with api-version
          local legacy = client(name, emu, { api_version = "2024-10-21" })
          assert.are.equal(b.id, assert(legacy:retrieve(b.id)).id)
          legacy:close()
        end
        c:close()
        H.rm_rf(dir)
      end)
      emu.stop()
      assert(ok, why)
    end)
  end

  it("raw statuses and shapes: Together's capitals and wrapped create, SiliconFlow's in_queue and error envelope",
    function()
    local emu = H.emulator({ dialect = "siliconflow", api_key = KEY, speed = 200 })
    local ok, why = pcall(function()
      local c = client("siliconflow", emu)
      local v, err = c:retrieve("batch_nope")
      assert.is_nil(v)
      assert.are.equal(404, err.status)
      assert.is_string(err.message)
      assert.is_truthy(tonumber(err.code), tostring(err.code))   -- its numeric code, as a string
      c:close()
    end)
    emu.stop()
    assert(ok, why)
  end)
end)

describe("Together's upload in three steps", function()
  local emu, c, dir
  before_each(function()
    emu = H.emulator({ dialect = "together", api_key = KEY, speed = 200 })
    c = client("together", emu)
    dir = H.tmpdir()
  end)
  after_each(function()
    c:close()
    emu.stop()
    H.rm_rf(dir)
  end)

  local function routes() return emu.stats().routes end

  it("presign, the PUT streamed from disk without the key, preprocess: the bytes arrive whole", function()
    local path = H.requests(dir .. "/big.jsonl", 10000, { url = "/v1/chat/completions", model = "m-1",
      content = function(i) return ("q%d "):format(i) .. ("x"):rep(500) end })
    local size = assert(require("lbatch.impl.formats.size").file(path))
    assert.is_true(size > 4 * 1024 * 1024)
    local last = 0
    local f = assert(c:upload(path, nil, { on_progress = function(done) last = done end }))
    assert.are.equal(size, f.bytes)
    assert.are.equal(size, last)
    assert.are.equal("big.jsonl", f.filename)
    assert.are.equal("batch-api", f.purpose)
    assert.is_true(f.Processed)
    local r = routes()
    assert.are.equal(1, r["POST /files"])
    assert.are.equal(1, r["PUT presigned"])                 -- with a key it would be refused (400)
    assert.are.equal(1, r["POST /files/{id}/preprocess"])
    local fh = assert(io.open(path, "rb"))
    local want = fh:read("a")
    fh:close()
    assert.is_true(assert(c:content(f.id)) == want, "the stored bytes differ from the file's")
  end)

  it("a failed PUT is sent again, the file read anew; bytes made in memory go the same way", function()
    local path = H.requests(dir .. "/in.jsonl", 3, { url = "/v1/chat/completions", model = "m-1" })
    H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/_presigned/", method = "PUT", status = 503 } })
    local f = assert(c:upload(path))
    assert.are.equal(2, routes()["PUT presigned"])
    assert.are.equal(select(2, assert(c:content(f.id)):gsub("\n", "")), 3)
    local m = assert(c:upload({ data = "{}\n", filename = "mem.jsonl" }))
    assert.are.equal(3, m.bytes)
    assert.are.equal("mem.jsonl", m.filename)
  end)

  it("an answer without the presigned URL is an error, not a file", function()
    H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "^/v1/files$", method = "POST", status = 200 } })
    local f, err = c:upload(H.requests(dir .. "/in.jsonl", 1, { url = "/v1/chat/completions", model = "m-1" }))
    assert.is_nil(f)
    assert.are.equal("invalid_upload_url", err.code)
    assert.is_nil(routes()["PUT presigned"])
  end)

  it("a pipeline stopped after the first step uploads again when it resumes, not the file without bytes", function()
    local pipeline = require "lbatch.pipeline"
    local input = H.requests(dir .. "/in.jsonl", 3, { url = "/v1/chat/completions", model = "m-1" })
    -- recover_window: the run looks for its upload that long before it sends it again (45 s by default;
    -- the bytes-less file is there from the start, so 1 s of looking shows that it is not taken)
    local o = { client = c, requests = input, dir = dir .. "/work", poll_interval = 0.05, max_poll_interval = 0.2,
                recover_window = 1 }
    o.on_step = function(step, s)
      if step == "before_upload" then
        -- what a run killed between the presign and the PUT leaves: a file of the shard's name, no bytes
        H.http("POST", emu.url .. "/v1/files", { key = KEY,
          json = { purpose = "batch-api", file_name = s.name, file_type = "jsonl" } })
        error("stopped")
      end
    end
    assert.is_nil(pipeline.run(o))
    o.on_step = nil
    local report = assert(pipeline.run(o))
    assert.are.equal(3, assert(report.results:summary()).ok)
    assert.are.equal(1, routes()["PUT presigned"])
  end)

  it("a create from a file whose bytes never came is refused", function()
    local status, _, headers = H.http("POST", emu.url .. "/v1/files", { key = KEY,
      json = { purpose = "batch-api", file_name = "x.jsonl", file_type = "jsonl" } })
    assert.are.equal(302, status)
    local id = headers["x-together-file-id"]
    local b, err = c:create({ input_file_id = id, endpoint = "/v1/chat/completions" })
    assert.is_nil(b)
    assert.are.equal(400, err.status)
    assert.are.equal("file_not_uploaded", err.code)
  end)
end)

describe("the pipeline takes a provider like a region", function()
  local pipeline = require "lbatch.pipeline"

  local function requests(n)
    local t = {}
    for i = 1, n do
      t[i] = { custom_id = "q" .. i, body = { model = "m-1", messages = { { role = "user", content = "question " .. i } } } }
    end
    return t
  end

  -- every batch the emulator holds, as it answers them in OpenAI's dialect
  local function batches(emu, name)
    local _, page = H.json("GET", emu.url .. service.PROVIDERS[name].prefix .. "/batches?limit=100", { key = KEY })
    return type(page) == "table" and (page.data or page) or {}
  end

  for _, name in ipairs({ "zhipu", "moonshot", "groq" }) do
    it(name .. ": pipeline.run{provider = ...}: its rules (Zhipu's /v4 urls), its dialect (no DashScope ds_name)",
      function()
      local emu = H.emulator({ dialect = name, api_key = KEY, speed = 200 })
      local dir = H.tmpdir()
      local ok, why = pcall(function()
        local report = assert(pipeline.run({ provider = name, base_url = emu.url .. service.PROVIDERS[name].prefix,
          api_key = KEY, requests = requests(5), model = "m-1", dir = dir .. "/work", max_lines = 2,
          poll_interval = 0.05, max_poll_interval = 0.2 }))
        assert.are.equal(3, #report.shards)
        local s = assert(report.results:summary())
        assert.are.equal(5, s.ok)
        assert.are.equal(name, report.client.config.provider)
        local want = name == "zhipu" and "/v4/chat/completions" or "/v1/chat/completions"
        for _, sh in ipairs(report.shards) do assert.are.equal(want, sh.endpoint) end
        local seen = batches(emu, name)
        assert.are.equal(3, #seen)
        for _, b in ipairs(seen) do
          assert.is_string(b.metadata.lbatch_run)
          assert.is_nil(b.metadata.ds_name, name .. " was sent DashScope's ds_name")
        end
        report.client:close()
      end)
      emu.stop()
      H.rm_rf(dir)
      assert(ok, why)
    end)
  end

  it("lbatch run --provider zhipu: the command's run on Zhipu's dialect", function()
    local emu = H.emulator({ dialect = "zhipu", api_key = KEY, speed = 200 })
    local dir = H.tmpdir()
    local ok, why = pcall(function()
      local input = H.requests(dir .. "/in.jsonl", 3, { url = "/v4/chat/completions", model = "glm-4" })
      local out = H.sh(("env ZHIPUAI_API_KEY=%s LBATCH_POLL_INTERVAL=0.05 %s %s/bin/lbatch run --provider zhipu "
        .. "--base-url %s --dir %s --output %s --json %s 2>&1; echo \"exit=$?\""):format(KEY, H.lua, H.root,
        H.q(emu.url .. "/api/paas/v4"), H.q(dir .. "/work"), H.q(dir .. "/out.jsonl"), H.q(input)))
      assert.matches("exit=0", out)
      local report = require("cjson").decode(out:match("(%b{})"))
      assert.are.equal(3, report.ok)
      assert.are.equal("/v4/chat/completions", batches(emu, "zhipu")[1].endpoint)
    end)
    emu.stop()
    H.rm_rf(dir)
    assert(ok, why)
  end)
end)

describe("three providers from one scheduler", function()
  it("runs a job on Azure, Groq and Together at once", function()
    local emus, clients = {}, {}
    local sched = lbatch.scheduler()
    local ok, why = pcall(function()
      for _, name in ipairs({ "azure", "groq", "together" }) do
        emus[name] = H.emulator({ dialect = name, api_key = KEY, speed = 200 })
        clients[name] = client(name, emus[name], { scheduler = sched })
      end
      local dir = H.tmpdir()
      local results = {}
      for name, c in pairs(clients) do
        sched:spawn(function()
          local url = url_of(name)
          local f = assert(c:upload(H.requests(dir .. "/" .. name .. ".jsonl", 2, { url = url, model = "m" })))
          local b = assert(c:create({ input_file_id = f.id, endpoint = url }))
          results[name] = assert(c:wait(b.id, { interval = 0.05, max_interval = 0.2, deadline = 60 }))
        end)
      end
      assert(sched:run())
      for _, name in ipairs({ "azure", "groq", "together" }) do
        assert.are.equal("completed", results[name].status, name)
      end
      H.rm_rf(dir)
    end)
    for _, c in pairs(clients) do c:close() end
    for _, e in pairs(emus) do e.stop() end
    assert(ok, why)
  end)
end)
