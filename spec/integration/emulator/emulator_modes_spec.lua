-- The emulator's failure modes (emulator/run's header) over real HTTP with
-- curl(1), in both dialects: token_limit, running_cap, arrears,
-- empty_output, line_errors, consistency_delay, cut_download (and Range),
-- hold; set by POST /_emulator/modes and by --mode at start, and off again.
local H = require "helper"
local cjson = require "cjson"

local CHAT = { dashscope = "qwen-plus", openai = "gpt-4o-mini" }
local EMBED = { dashscope = "text-embedding-v4", openai = "text-embedding-3-small" }
local TAIL = " Please try again once some in_progress batches have been completed."

local function modes(emu, changes)
  local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = changes })
  assert.are.equal(200, status, cjson.encode(body))
  return body
end

-- n chat lines of 40 bytes of prompt each: 10 prompt tokens a line
local function chat_file(dir, name, n, model, content)
  return H.requests(dir .. "/" .. name, n, {
    url = "/v1/chat/completions", model = model, content = function() return content or ("x"):rep(40) end })
end

local function embed_file(dir, name, n, model)
  return H.requests(dir .. "/" .. name, n, { line = function(i)
    return { custom_id = "e-" .. i, method = "POST", url = "/v1/embeddings",
             body = { model = model, input = "text " .. i } } end })
end

local function upload(emu, path)
  return H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. path } })
end

local function uploaded(emu, path)
  local status, f = upload(emu, path)
  assert.are.equal(200, status, cjson.encode(f))
  return f.id
end

local function create(emu, fid, endpoint, meta)
  return H.json("POST", emu.base .. "/batches", { json = {
    input_file_id = fid, endpoint = endpoint or "/v1/chat/completions", completion_window = "24h",
    metadata = meta } })
end

local function created(emu, fid, endpoint, meta)
  local status, b = create(emu, fid, endpoint, meta)
  assert.are.equal(200, status, cjson.encode(b))
  return b
end

-- a batch that stays in_progress (each line takes 100000 service seconds)
local SLOW = { emulator_line_seconds = "100000" }

local function lines_of(emu, id)
  local status, body = H.http("GET", emu.base .. "/files/" .. id .. "/content")
  assert.are.equal(200, status, body)
  local out = {}
  for l in body:gmatch("[^\n]+") do out[#out + 1] = cjson.decode(l) end
  return out
end

local function cancel(emu, id)
  assert.are.equal(200, (H.json("POST", emu.base .. "/batches/" .. id .. "/cancel")))
  assert.are.equal("cancelled", H.wait_final(emu, id).status)
end

local function hits(emu, name)
  local s = emu.stats()
  return type(s.modes_hit) == "table" and s.modes_hit[name] or 0
end

local function error_body(body, code, message, typ)
  assert.are.same({ error = { code = code, message = message, type = typ, param = cjson.null } }, body)
end

describe("emulator failure modes", function()
  local emus, dir = {}, nil
  setup(function()
    dir = H.tmpdir()
    -- rate limits off in both: running_cap needs none
    emus.dashscope = H.emulator({ speed = 200, dialect = "dashscope", rate_limits = false })
    emus.openai = H.emulator({ speed = 200, dialect = "openai" })
  end)
  teardown(function()
    for _, emu in pairs(emus) do emu.stop() end
    H.rm_rf(dir)
  end)

  -- every case starts with all off (a failed one may leave some on)
  before_each(function()
    for _, emu in pairs(emus) do
      modes(emu, { token_limit = false, running_cap = false, arrears = false, empty_output = false,
                   line_errors = false, consistency_delay = false, cut_download = false, hold = false })
    end
  end)

  local function each(fn)
    for _, d in ipairs({ "dashscope", "openai" }) do fn(emus[d], d) end
  end

  it("starts with every mode off; checks what POST /_emulator/modes is given, changing nothing when wrong", function()
    local emu = emus.openai
    for _, e in pairs(emus) do
      local status, on = H.json("GET", e.url .. "/_emulator/modes")
      assert.are.equal(200, status)
      assert.are.same({}, on)
    end
    for _, bad in ipairs({ { nope = {} }, { hold = { status = "in_progress", seconds = 1 } },
                           { line_errors = { status = 404, every = 2 } }, { running_cap = 3 },
                           { token_limit = {} }, { cut_download = { bytes = 10 }, hold = {} } }) do
      local status, body = H.json("POST", emu.url .. "/_emulator/modes", { json = bad })
      assert.are.equal(400, status, cjson.encode(bad))
      assert.are.equal("invalid_mode", body.error.code)
    end
    assert.are.same({}, select(2, H.json("GET", emu.url .. "/_emulator/modes")))
    assert.are.same({ hold = { status = "finalizing", seconds = 5 }, empty_output = true },
      modes(emu, { hold = { status = "finalizing", seconds = 5 }, empty_output = true }))
    assert.are.same({ empty_output = true }, modes(emu, { hold = false }))
    assert.are.same({}, modes(emu, { empty_output = false }))
  end)

  it("token_limit: enqueued tokens per model fail a batch leaving validating; requests for embeddings; "
    .. "fail_fast refuses create", function()
    each(function(emu, d)
      local model = CHAT[d]
      modes(emu, { token_limit = { tokens = 25 } })
      -- 20 tokens enqueued (in_progress), then 10 more: over 25
      local a = created(emu, uploaded(emu, chat_file(dir, d .. "-tl-a.jsonl", 2, model)), nil, SLOW)
      assert.are.equal("in_progress", H.wait_status(emu, a.id, "in_progress").status)
      local fid = uploaded(emu, chat_file(dir, d .. "-tl-b.jsonl", 1, model))
      local b = created(emu, fid)                                   -- accepted
      assert.are.equal("validating", b.status)
      b = H.wait_final(emu, b.id)
      assert.are.equal("failed", b.status)
      assert.are.equal("integer", H.jtype(b.failed_at))
      assert.are.same({ object = "list", data = { {
        code = "token_limit_exceeded", line = cjson.null, param = cjson.null,
        message = "Enqueued token limit reached for " .. model .. " in organization org-emulator. "
          .. "Limit: 25 enqueued tokens." .. TAIL } } }, b.errors)
      assert.are.same({ total = 0, completed = 0, failed = 0 }, b.request_counts)
      -- another model has its own count
      local efile = uploaded(emu, embed_file(dir, d .. "-tl-e.jsonl", 3, EMBED[d]))
      assert.are.equal("completed", H.wait_final(emu, created(emu, efile, "/v1/embeddings").id).status)
      -- fail_fast: create itself answers 400 (Azure's way)
      modes(emu, { token_limit = { tokens = 25, fail_fast = true } })
      local status, body = create(emu, fid)
      assert.are.equal(400, status)
      error_body(body, "token_limit_exceeded", "Enqueued token limit reached for " .. model
        .. " in organization org-emulator. Limit: 25 enqueued tokens." .. TAIL, "invalid_request_error")
      -- the failed batch does not count; a done one neither: once A is cancelled, B's file runs
      cancel(emu, a.id)
      assert.are.equal("completed", H.wait_final(emu, created(emu, fid).id).status)
      -- requests: for /v1/embeddings batches, by lines
      modes(emu, { token_limit = { tokens = 1000000, requests = 2 } })
      local e = H.wait_final(emu, created(emu, efile, "/v1/embeddings").id)
      assert.are.equal("failed", e.status)
      assert.are.equal("Enqueued request limit reached for " .. EMBED[d] .. " in organization org-emulator. "
        .. "Limit: 2 enqueued requests." .. TAIL, e.errors.data[1].message)
      assert.are.equal("token_limit_exceeded", e.errors.data[1].code)
      -- chat batches have no request limit
      assert.are.equal("completed", H.wait_final(emu, created(emu, fid).id).status)
      assert.is_true(hits(emu, "token_limit") >= 3)
      -- off: the embeddings batch runs
      modes(emu, { token_limit = false })
      assert.are.equal("completed", H.wait_final(emu, created(emu, efile, "/v1/embeddings").id).status)
    end)
  end)

  it("token_limit from --mode at start, the limit written with thousands commas", function()
    local data = H.tmpdir()
    local port, pid, log
    for _ = 1, 10 do
      port = H.free_port()
      log = data .. "/log"
      local tls = H.tls_ca and (" --tls --ca " .. H.q(H.tls_ca)) or ""
      pid = H.sh(("setsid %s/emulator/run --port %d --data %s --speed 200 --dialect openai%s "
        .. "--mode %s >%s 2>&1 & echo $!"):format(H.root, port, H.q(data), tls,
        H.q('token_limit={"tokens":2000}'), H.q(log))):match("%d+")
      for _ = 1, 100 do
        if (H.read(log) or ""):find("listening on", 1, true) then break end
        H.sleep(0.05)
      end
      if (H.read(log) or ""):find("listening on", 1, true) then break end
      H.ok("kill -TERM " .. pid .. " 2>/dev/null")
      pid = nil
    end
    assert.is_not_nil(pid, "emulator/run --mode did not start")
    local url = (H.read(log):match("listening on (https?://[%d.:]+)"))
    local emu = { url = url, base = url .. "/v1" }
    finally(function()
      H.ok("kill -TERM " .. pid .. " 2>/dev/null")
      for _ = 1, 100 do
        if not H.running(pid) then break end
        H.sleep(0.05)
      end
      H.rm_rf(data)
    end)
    local status, on = H.json("GET", emu.url .. "/_emulator/modes")
    assert.are.equal(200, status)
    assert.are.same({ token_limit = { tokens = 2000, fail_fast = false } }, on)
    -- one line of 8004 bytes: 2001 prompt tokens
    local fid = uploaded(emu, chat_file(dir, "flag.jsonl", 1, "gpt-4o-mini", ("y"):rep(8004)))
    local b = H.wait_final(emu, created(emu, fid).id)
    assert.are.equal("failed", b.status)
    assert.are.equal("Enqueued token limit reached for gpt-4o-mini in organization org-emulator. "
      .. "Limit: 2,000 enqueued tokens." .. TAIL, b.errors.data[1].message)
    -- 2000 tokens pass
    fid = uploaded(emu, chat_file(dir, "flag2.jsonl", 1, "gpt-4o-mini", ("y"):rep(8000)))
    b = H.wait_final(emu, created(emu, fid).id)
    assert.are.equal("completed", b.status)
    local out = lines_of(emu, b.output_file_id)
    assert.are.equal(2000, out[1].response.body.usage.prompt_tokens)   -- the count it uses
    -- a wrong --mode stops it at start
    local rc = H.ok(("timeout 20 %s/emulator/run --port %d --mode 'nope={}' >/dev/null 2>&1"):format(H.root, port + 1))
    assert.is_false(rc)
  end)

  it("running_cap: 429 too_many_running_batches past N running batches, without --rate-limits", function()
    each(function(emu, d)
      modes(emu, { running_cap = { jobs = 1 } })
      local fid = uploaded(emu, chat_file(dir, d .. "-cap.jsonl", 1, CHAT[d]))
      local a = created(emu, fid, nil, SLOW)
      local status, body, headers = create(emu, fid)
      assert.are.equal(429, status)
      error_body(body, "too_many_running_batches", "At most 1 batches may be running at once.", "rate_limit_error")
      assert.are.equal("60", headers["retry-after"])
      assert.are.equal(1, hits(emu, "running_cap"))
      modes(emu, { running_cap = { jobs = 2 } })
      local b = created(emu, fid)
      assert.are.equal("completed", H.wait_final(emu, b.id).status)
      modes(emu, { running_cap = false })
      cancel(emu, created(emu, fid, nil, SLOW).id)
      cancel(emu, a.id)
    end)
  end)

  it("arrears: dashscope fails every line with Arrearage, openai refuses create and upload", function()
    local emu, path = emus.dashscope, chat_file(dir, "arrears-d.jsonl", 3, CHAT.dashscope)
    modes(emu, { arrears = { after = 1 } })
    local fid = uploaded(emu, path)
    assert.are.equal("completed", H.wait_final(emu, created(emu, fid).id).status)    -- the one before
    local b = H.wait_final(emu, created(emu, fid).id)
    assert.are.equal("completed", b.status)
    assert.are.same({ total = 3, completed = 0, failed = 3 }, b.request_counts)
    assert.are.equal(cjson.null, b.output_file_id)
    local lines = lines_of(emu, b.error_file_id)
    assert.are.equal(3, #lines)
    for i, l in ipairs(lines) do
      assert.are.equal("req-" .. i, l.custom_id)
      assert.are.equal("string", type(l.id))
      assert.are.equal(400, l.response.status_code)
      assert.are.equal("string", type(l.response.request_id))
      assert.are.same({ error = { code = "Arrearage", type = "Arrearage", param = cjson.null,
        message = "Access denied, please make sure your account is in good standing." } }, l.response.body)
      assert.are.same({ code = "Arrearage",
        message = "Access denied, please make sure your account is in good standing." }, l.error)
    end
    assert.are.equal(1, hits(emu, "arrears"))
    modes(emu, { arrears = false })
    assert.are.same({ total = 3, completed = 3, failed = 0 }, H.wait_final(emu, created(emu, fid).id).request_counts)

    emu = emus.openai
    fid = uploaded(emu, chat_file(dir, "arrears-o.jsonl", 2, CHAT.openai))
    modes(emu, { arrears = { after = 0 } })
    local quota = "You exceeded your current quota, please check your plan and billing details."
    local status, body = create(emu, fid)
    assert.are.equal(429, status)
    error_body(body, "insufficient_quota", quota, "insufficient_quota")
    status, body = upload(emu, path)
    assert.are.equal(429, status)
    error_body(body, "insufficient_quota", quota, "insufficient_quota")
    modes(emu, { arrears = { after = 1 } })
    created(emu, fid)
    assert.are.equal(429, (create(emu, fid)))
    modes(emu, { arrears = false })
    assert.are.equal("completed", H.wait_final(emu, created(emu, fid).id).status)
    assert.are.equal(200, (upload(emu, path)))
  end)

  it("empty_output: completed with output_file_id null and every line in the error file", function()
    each(function(emu, d)
      local fid = uploaded(emu, chat_file(dir, d .. "-empty.jsonl", 3, CHAT[d]))
      modes(emu, { empty_output = true })
      local b = H.wait_final(emu, created(emu, fid).id)
      assert.are.equal("completed", b.status)
      assert.are.equal(cjson.null, b.output_file_id)
      assert.are.same({ total = 3, completed = 0, failed = 3 }, b.request_counts)
      local lines = lines_of(emu, b.error_file_id)
      assert.are.equal(3, #lines)
      for i, l in ipairs(lines) do
        assert.are.equal("req-" .. i, l.custom_id)
        assert.are.equal(500, l.response.status_code)
        assert.are.equal("internal_error", l.response.body.error.code)
        assert.are.equal("internal_error", l.error.code)
        assert.are.equal("string", type(l.error.message))
      end
      assert.are.equal(1, hits(emu, "empty_output"))
      modes(emu, { empty_output = false })
      b = H.wait_final(emu, created(emu, fid).id)
      assert.are.same({ total = 3, completed = 3, failed = 0 }, b.request_counts)
      assert.are.equal("string", type(b.output_file_id))
    end)
  end)

  it("line_errors: lines 1, N+1, ... answered 500 or 429 in the output file, error null, counted failed", function()
    each(function(emu, d)
      for _, status in ipairs({ 500, 429 }) do
        local fid = uploaded(emu, chat_file(dir, d .. "-le.jsonl", 5, CHAT[d]))
        modes(emu, { line_errors = { status = status, every = 2 } })
        local b = H.wait_final(emu, created(emu, fid).id)
        assert.are.equal("completed", b.status)
        assert.are.same({ total = 5, completed = 2, failed = 3 }, b.request_counts)
        assert.is_true(b.error_file_id == nil or b.error_file_id == cjson.null)
        local lines = lines_of(emu, b.output_file_id)
        assert.are.equal(5, #lines)
        for i, l in ipairs(lines) do
          assert.are.equal("req-" .. i, l.custom_id)
          assert.are.equal(cjson.null, l.error)
          if i % 2 == 1 then
            assert.are.equal(status, l.response.status_code)
            assert.are.equal(status == 429 and "rate_limit_exceeded" or "server_error", l.response.body.error.code)
            assert.are.equal("string", type(l.response.body.error.message))
          else
            assert.are.equal(200, l.response.status_code)
          end
        end
      end
      assert.are.equal(6, hits(emu, "line_errors"))
      modes(emu, { line_errors = false })
      local fid = uploaded(emu, chat_file(dir, d .. "-le2.jsonl", 2, CHAT[d]))
      assert.are.same({ total = 2, completed = 2, failed = 0 }, H.wait_final(emu, created(emu, fid).id).request_counts)
    end)
  end)

  it("consistency_delay: a new file and a new batch are unknown for S service seconds", function()
    each(function(emu, d)
      local path = chat_file(dir, d .. "-cd.jsonl", 1, CHAT[d])
      local _, unknown_file = create(emu, "file-batch-000000000000000000000000")
      local _, unknown_batch = H.json("GET", emu.base .. "/batches/batch_unknown")
      modes(emu, { consistency_delay = { seconds = 100000 } })
      local fid = uploaded(emu, path)
      local status, body = create(emu, fid)
      assert.are.equal(404, status)
      assert.are.same(unknown_file.error.code, body.error.code)
      assert.are.equal("No such file: " .. fid, body.error.message)
      assert.are.equal((unknown_file.error.message:gsub("file%-batch%-0+", fid)), body.error.message)
      -- S service seconds later (the clock moved): there
      assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 100000 } })))
      local b = created(emu, fid)
      status, body = H.json("GET", emu.base .. "/batches/" .. b.id)
      assert.are.equal(404, status)
      assert.are.same(unknown_batch.error.code, body.error.code)
      assert.are.equal("No such batch: " .. b.id, body.error.message)
      assert.are.equal(2, hits(emu, "consistency_delay"))
      modes(emu, { consistency_delay = false })
      assert.are.equal("completed", H.wait_final(emu, b.id).status)
      local fid2 = uploaded(emu, path)
      assert.are.equal(200, (create(emu, fid2)))
    end)
  end)

  it("cut_download: the first download of a file is cut after B bytes; Range resumes it with 206", function()
    each(function(emu, d)
      local fid = uploaded(emu, chat_file(dir, d .. "-cut.jsonl", 3, CHAT[d]))
      local b = H.wait_final(emu, created(emu, fid).id)
      local url = emu.base .. "/files/" .. b.output_file_id .. "/content"
      local fid2 = H.wait_final(emu, created(emu, fid).id).output_file_id
      local url2 = emu.base .. "/files/" .. fid2 .. "/content"
      -- Range always: 206 and Content-Range
      local status, whole = H.http("GET", url)
      assert.are.equal(200, status)
      local size = #whole
      local body, headers
      status, body, headers = H.http("GET", url, { headers = { "Range: bytes=7-" } })
      assert.are.equal(206, status)
      assert.are.equal(("bytes 7-%d/%d"):format(size - 1, size), headers["content-range"])
      assert.are.equal(whole:sub(8), body)

      modes(emu, { cut_download = { bytes = 10 } })
      local rc
      status, body, headers, rc = H.http("GET", url)          -- downloaded before, but not while on
      assert.are.equal(200, status)
      assert.are.equal(tostring(size), headers["content-length"])
      assert.are.equal(whole:sub(1, 10), body)
      assert.is_true(rc == 18 or rc == 92, tostring(rc))      -- curl: partial file (HTTP/2: stream reset)
      -- resumed
      status, body, headers, rc = H.http("GET", url, { headers = { "Range: bytes=10-" } })
      assert.are.equal(206, status)
      assert.are.equal(0, rc)
      assert.are.equal(("bytes 10-%d/%d"):format(size - 1, size), headers["content-range"])
      assert.are.equal(whole, whole:sub(1, 10) .. body)
      assert.are.equal(whole, select(2, H.http("GET", url)))
      -- a first download with a Range is cut too, its range's length announced
      status, body, headers, rc = H.http("GET", url2, { headers = { "Range: bytes=5-" } })
      assert.are.equal(206, status)
      assert.is_true(rc == 18 or rc == 92, tostring(rc))
      assert.are.equal(tostring(size - 5), headers["content-length"])
      assert.are.equal(("bytes 5-%d/%d"):format(size - 1, size), headers["content-range"])
      assert.are.equal(10, #body)
      status, body = H.http("GET", url2, { headers = { "Range: bytes=15-" } })
      assert.are.equal(206, status)
      assert.are.equal(size - 15, #body)
      assert.are.equal(2, hits(emu, "cut_download"))
      modes(emu, { cut_download = false })
    end)
  end)

  it("hold: batches stay validating or finalizing S seconds longer (stuck), released when it is off", function()
    each(function(emu, d)
      local fid = uploaded(emu, chat_file(dir, d .. "-hold.jsonl", 2, CHAT[d]))
      for i, stage in ipairs({ "validating", "finalizing" }) do
        modes(emu, { hold = { status = stage, seconds = 1e9 } })
        local b = created(emu, fid)
        assert.are.equal(stage, H.wait_status(emu, b.id, stage).status)
        H.sleep(0.5)                                    -- 100 service seconds: normally long done
        assert.are.equal(stage, select(2, H.json("GET", emu.base .. "/batches/" .. b.id)).status)
        assert.are.equal(i, hits(emu, "hold"))
        modes(emu, { hold = false })
        assert.are.equal("completed", H.wait_final(emu, b.id).status)
      end
      -- a short hold only delays: 200 service seconds (1 s here) more validating
      modes(emu, { hold = { status = "validating", seconds = 200 } })
      local t0 = H.now()
      local b = H.wait_final(emu, created(emu, fid).id)
      assert.are.equal("completed", b.status)
      assert.is_true(H.now() - t0 >= 0.9)
    end)
  end)
end)
