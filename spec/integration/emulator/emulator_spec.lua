-- The emulator over real HTTP with curl(1): files, batches, lifecycle,
-- validation, execution, cancel, expiry, rate limits, callbacks, faults,
-- bad input and restarts.
local H = require "helper"
local cjson = require "cjson"

local function upload(emu, path, purpose)
  local status, f = H.json("POST", emu.base .. "/files",
    { form = { "purpose=" .. (purpose or "batch"), "file=@" .. path } })
  assert.are.equal(200, status, cjson.encode(f))
  return f
end

local function create(emu, fid, endpoint, extra)
  local req = { input_file_id = fid, endpoint = endpoint or "/v1/chat/ds-test", completion_window = "24h" }
  for k, v in pairs(extra or {}) do req[k] = v end
  local status, b = H.json("POST", emu.base .. "/batches", { json = req })
  assert.are.equal(200, status, cjson.encode(b))
  return b
end

local function lines_of(text)
  local out = {}
  for l in (text or ""):gmatch("[^\n]+") do out[#out + 1] = cjson.decode(l) end
  return out
end

local function content(emu, id)
  local status, body = H.http("GET", emu.base .. "/files/" .. id .. "/content")
  assert.are.equal(200, status, body)
  return lines_of(body)
end

local function is_error_shape(body)
  return type(body) == "table" and type(body.error) == "table" and type(body.error.message) == "string"
    and body.error.type ~= nil and body.error.param ~= nil and body.error.code ~= nil
end

describe("emulator (dashscope dialect)", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200 })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  describe("server", function()
    it("serves /v1 and /compatible-mode/v1 alike", function()
      local s1, a = H.json("GET", emu.url .. "/v1/files")
      local s2, b = H.json("GET", emu.url .. "/compatible-mode/v1/files")
      assert.are.equal(200, s1)
      assert.are.equal(200, s2)
      assert.are.same(a, b)
    end)

    it("needs a bearer key", function()
      local status, body = H.json("GET", emu.base .. "/batches", { key = false })
      assert.are.equal(401, status)
      assert.is_true(is_error_shape(body))
      status = H.json("GET", emu.base .. "/batches", { headers = { "Authorization: Basic eDp5" }, key = false })
      assert.are.equal(401, status)
    end)

    it("answers unknown routes and ids with 404 errors", function()
      for _, url in ipairs({ "/nope", "/files/file-batch-missing", "/batches/batch_missing",
                             "/files/file-batch-missing/content" }) do
        local status, body = H.json("GET", emu.base .. url)
        assert.are.equal(404, status, url)
        assert.is_true(is_error_shape(body), url)
      end
      local status, body = H.json("POST", emu.base .. "/batches/batch_missing/cancel")
      assert.are.equal(404, status)
      assert.is_true(is_error_shape(body))
    end)
  end)

  describe("files", function()
    it("uploads with Content-Length and with chunked encoding, streamed to disk", function()
      local path = H.requests(dir .. "/up.jsonl", 3)
      local size = #H.read(path)
      local f = upload(emu, path)
      assert.matches("^file%-batch%-", f.id)
      assert.are.same({ "file", size, "up.jsonl", "batch", "processed" },
                      { f.object, f.bytes, f.filename, f.purpose, f.status })
      assert.is_number(f.created_at)
      local status, g = H.json("POST", emu.base .. "/files",
        { headers = { "Transfer-Encoding: chunked" }, form = { "purpose=batch", "file=@" .. path } })
      assert.are.equal(200, status, cjson.encode(g))
      assert.are.equal(size, g.bytes)
      local _, got = H.json("GET", emu.base .. "/files/" .. g.id)
      assert.are.same(g, got)
    end)

    it("lists files newest first with limit and after", function()
      local path = H.requests(dir .. "/l.jsonl", 1)
      local a, b = upload(emu, path), upload(emu, path)
      local _, page = H.json("GET", emu.base .. "/files?limit=1")
      assert.are.equal(b.id, page.data[1].id)
      assert.is_true(page.has_more)
      local _, p2 = H.json("GET", emu.base .. "/files?limit=1&after=" .. b.id)
      assert.are.equal(a.id, p2.data[1].id)
    end)

    it("deletes files", function()
      local f = upload(emu, H.requests(dir .. "/d.jsonl", 1))
      local status, body = H.json("DELETE", emu.base .. "/files/" .. f.id)
      assert.are.equal(200, status)
      assert.are.same({ id = f.id, object = "file", deleted = true }, body)
      assert.are.equal(404, (H.json("GET", emu.base .. "/files/" .. f.id)))
    end)

    it("downloads only output files in the dashscope dialect", function()
      local f = upload(emu, H.requests(dir .. "/c.jsonl", 1))
      local status, body = H.json("GET", emu.base .. "/files/" .. f.id .. "/content")
      assert.are.equal(400, status)
      assert.are.equal("file_not_downloadable", body.error.code)
    end)

    it("refuses bad uploads with clear 4xx errors", function()
      local path = H.requests(dir .. "/bad.jsonl", 1)
      local cases = {
        { { form = { "file=@" .. path } }, 400, "missing_purpose" },
        { { form = { "purpose=batch" } }, 400, "missing_file" },
        { { form = { "purpose=fine-tune", "file=@" .. path } }, 400, "invalid_purpose" },
        { { data = "not multipart", headers = { "Content-Type: text/plain" } }, 400, "invalid_request" },
        { { data = "--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nabc",
            headers = { "Content-Type: multipart/form-data; boundary=xyz" } }, 400, "invalid_multipart" },
      }
      for i, c in ipairs(cases) do
        local status, body = H.json("POST", emu.base .. "/files", c[1])
        assert.are.equal(c[2], status, "case " .. i)
        assert.are.equal(c[3], body.error.code, "case " .. i)
      end
    end)

    it("answers 413 past 500 MB and 400 for huge headers, and keeps serving", function()
      local big = dir .. "/big.bin"
      H.ok("truncate -s 501M " .. big)
      local status, body = H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. big } })
      os.remove(big)
      assert.are.equal(413, status)
      assert.is_true(is_error_shape(body))
      status, body = H.json("GET", emu.base .. "/files", { headers = { "X-Huge: " .. ("a"):rep(70000) } })
      assert.are.equal(400, status)
      assert.is_true(is_error_shape(body))
      assert.are.equal(200, (H.json("GET", emu.base .. "/files")))
    end)
  end)

  describe("batches", function()
    -- a chat model: the test model allows only 2 running batches
    local fid
    local chat = "/v1/chat/completions"
    setup(function()
      fid = upload(emu, H.requests(dir .. "/b.jsonl", 3, { url = chat, model = "qwen-plus" })).id
    end)

    it("checks create parameters", function()
      local cases = {
        { { endpoint = "/v1/chat/ds-test", completion_window = "24h" }, 400, "missing_required_parameter" },
        { { input_file_id = fid, endpoint = "/v1/completions", completion_window = "24h" }, 400, "invalid_endpoint" },
        { { input_file_id = fid, endpoint = chat, completion_window = "23h" }, 400, "invalid_completion_window" },
        { { input_file_id = fid, endpoint = "/v1/chat/ds-test", completion_window = "15d" }, 400, "invalid_completion_window" },
        { { input_file_id = fid, endpoint = "/v1/chat/ds-test", completion_window = 24 }, 400, "invalid_completion_window" },
        { { input_file_id = fid, endpoint = "/v1/chat/ds-test", completion_window = "24h", metadata = { a = 1 } }, 400, "invalid_metadata" },
        { { input_file_id = "file-batch-nope", endpoint = "/v1/chat/ds-test", completion_window = "24h" }, 404, "file_not_found" },
      }
      for i, c in ipairs(cases) do
        local status, body = H.json("POST", emu.base .. "/batches", { json = c[1] })
        assert.are.equal(c[2], status, "case " .. i)
        assert.are.equal(c[3], body.error.code, "case " .. i)
      end
      local status, body = H.json("POST", emu.base .. "/batches", { json = "{not json" })
      assert.are.equal(400, status)
      assert.are.equal("invalid_json", body.error.code)
      for _, w in ipairs({ "24h", "336h", "14d", "72h" }) do
        local b = create(emu, fid, chat, { completion_window = w })
        assert.are.equal(w, b.completion_window)
      end
    end)

    it("refuses an output file as input with 422", function()
      local b = H.wait_final(emu, create(emu, fid, chat).id)
      local status, body = H.json("POST", emu.base .. "/batches",
        { json = { input_file_id = b.output_file_id, endpoint = "/v1/chat/ds-test", completion_window = "24h" } })
      assert.are.equal(422, status)
      assert.are.equal("invalid_input_file", body.error.code)
    end)

    it("runs validating -> in_progress -> finalizing -> completed, stamping each *_at", function()
      local b = create(emu, fid, chat, { metadata = { ds_name = "life", ds_description = "x" } })
      assert.are.equal("validating", b.status)
      assert.are.equal(cjson.null, b.in_progress_at)
      assert.are.equal(cjson.null, b.expires_at)          -- the service sends null at every stage
      -- what it went through, from its stamps (a poll may miss a state that
      -- lasts a moment: this machine may be busy)
      local created = b.created_at
      b = H.wait_final(emu, b.id, 120)
      assert.are.equal("completed", b.status)
      for _, k in ipairs({ "in_progress_at", "finalizing_at", "completed_at" }) do assert.is_number(b[k], k) end
      assert.is_true(created <= b.in_progress_at and b.in_progress_at <= b.finalizing_at, "stamps out of order")
      assert.are.equal(cjson.null, b.failed_at)
      assert.are.same({ total = 3, completed = 3, failed = 0 }, b.request_counts)
      assert.is_nil(b.model)                 -- the service's batch objects have no model and no usage
      assert.is_nil(b.usage)
      assert.are.equal(b.completed_at, b.finalizing_at)   -- as the service records them
      assert.are.same({ ds_name = "life", ds_description = "x" }, b.metadata)
    end)

    it("grows request_counts while a batch runs", function()
      local f = upload(emu, H.requests(dir .. "/grow.jsonl", 40, { url = chat, model = "qwen-plus" }))
      -- 40 lines of 10 service seconds each: 2 real seconds at speed 200 (polled every 0.05 s)
      local b = create(emu, f.id, chat, { metadata = { emulator_line_seconds = "10" } })
      local counts = {}
      local deadline = H.now() + 20
      repeat
        local _, cur = H.json("GET", emu.base .. "/batches/" .. b.id)
        if cur.status == "in_progress" then counts[#counts + 1] = cur.request_counts.completed end
        b = cur
        H.sleep(0.05)
      until H.FINAL[b.status] or H.now() > deadline
      assert.are.equal("completed", b.status)
      assert.is_true(#counts >= 3)
      for i = 2, #counts do assert.is_true(counts[i] >= counts[i - 1]) end
      assert.is_true(counts[#counts] > counts[1])
      assert.is_true(counts[1] < 40)
    end)

    it("lists newest first with after, limit, has_more, first_id and last_id", function()
      local ids = {}
      for i = 1, 3 do ids[i] = create(emu, fid, chat, { metadata = { ds_name = "page-" .. i } }).id end
      local _, p = H.json("GET", emu.base .. "/batches?limit=2")
      assert.are.same({ ids[3], ids[2] }, { p.data[1].id, p.data[2].id })
      assert.are.same({ ids[3], ids[2], true }, { p.first_id, p.last_id, p.has_more })
      local _, p2 = H.json("GET", emu.base .. "/batches?limit=1&after=" .. ids[2])
      assert.are.equal(ids[1], p2.data[1].id)
      for _ = 1, 18 do create(emu, fid, chat) end
      local _, d = H.json("GET", emu.base .. "/batches")
      assert.are.equal(20, #d.data)
      assert.is_true(d.has_more)
      assert.are.equal(400, (H.json("GET", emu.base .. "/batches?limit=101")))
      assert.are.equal(400, (H.json("GET", emu.base .. "/batches?limit=0")))
    end)

    it("filters by status, ds_name, input_file_ids and creation time", function()
      local f2 = upload(emu, H.requests(dir .. "/f2.jsonl", 1, { url = chat, model = "qwen-plus" })).id
      local b = create(emu, f2, chat, { metadata = { ds_name = "nightly-eval-7" } })
      local _, p = H.json("GET", emu.base .. "/batches?ds_name=eval-7")
      assert.are.equal(1, #p.data)
      assert.are.equal(b.id, p.data[1].id)
      _, p = H.json("GET", emu.base .. "/batches?input_file_ids=" .. f2 .. ",file-batch-x")
      assert.are.equal(1, #p.data)
      H.wait_final(emu, b.id)
      _, p = H.json("GET", emu.base .. "/batches?status=completed,expired&input_file_ids=" .. f2)
      assert.are.equal(1, #p.data)
      _, p = H.json("GET", emu.base .. "/batches?status=failed&input_file_ids=" .. f2)
      assert.are.equal(cjson.null, p.data)        -- dashscope: an empty list is null
      assert.are.equal(cjson.null, p.first_id)
      _, p = H.json("GET", emu.base .. "/batches?create_after=20990101000000")
      assert.are.equal(cjson.null, p.data)
      _, p = H.json("GET", emu.base .. "/batches?create_before=20990101000000&create_after=20000101000000&ds_name=eval-7")
      assert.are.equal(1, #p.data)
      assert.are.equal(400, (H.json("GET", emu.base .. "/batches?create_after=2024-01-01")))
    end)
  end)

  describe("validation", function()
    local function fails(lines, endpoint)
      local path = dir .. "/v" .. math.random(1e9) .. ".jsonl"
      H.write(path, table.concat(lines, "\n") .. (#lines > 0 and "\n" or ""))
      local b = H.wait_final(emu, create(emu, upload(emu, path).id, endpoint or "/v1/chat/completions").id)
      assert.are.equal("failed", b.status)
      assert.is_number(b.failed_at)
      return b.errors.data
    end
    local function chat(id, model, extra)
      local body = { model = model or "qwen-plus", messages = { { role = "user", content = "hi" } } }
      for k, v in pairs(extra or {}) do body[k] = v end
      return cjson.encode({ custom_id = id, method = "POST", url = "/v1/chat/completions", body = body })
    end
    local function has(errs, code, line)
      for _, e in ipairs(errs) do
        if e.code == code and (line == nil or e.line == line) then return true end
      end
      return false
    end

    it("reports each broken line with its number and code", function()
      local errs = fails({
        chat("a"),
        "{not json",
        cjson.encode({ method = "POST", url = "/v1/chat/completions", body = { model = "qwen-plus" } }),
        chat("a"),
        cjson.encode({ custom_id = "m", method = "GET", url = "/v1/chat/completions", body = { model = "qwen-plus" } }),
        cjson.encode({ custom_id = "u", method = "POST", url = "/v1/embeddings", body = { model = "qwen-plus" } }),
        chat("second", "qwen-max"),
        chat("think", "qwen-plus", { enable_thinking = true }),
      })
      assert.is_true(has(errs, "invalid_json_line", 2))
      assert.is_true(has(errs, "missing_custom_id", 3))
      assert.is_true(has(errs, "duplicate_custom_id", 4))
      assert.is_true(has(errs, "invalid_method", 5))
      assert.is_true(has(errs, "url_mismatch", 6))
      assert.is_true(has(errs, "model_mismatch", 7))
      assert.is_true(has(errs, "mismatched_thinking", 8))
      assert.is_false(has(errs, nil, 1))
    end)

    it("fails an empty file", function()
      assert.is_true(has(fails({}), "empty_file"))
    end)

    it("fails a line over 6 MB", function()
      local huge = cjson.encode({ custom_id = "big", method = "POST", url = "/v1/chat/completions",
        body = { model = "qwen-plus", messages = { { role = "user", content = ("x"):rep(6 * 1024 * 1024) } } } })
      assert.is_true(has(fails({ chat("a"), huge }), "line_too_large", 2))
    end)

    it("fails more than 50,000 lines", function()
      local path = dir .. "/many.jsonl"
      local f = assert(io.open(path, "wb"))
      local line = '","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus","messages":[{"role":"user","content":"x"}]}}\n'
      for i = 1, 50001 do f:write('{"custom_id":"', i, line) end
      f:close()
      local b = H.wait_final(emu, create(emu, upload(emu, path).id, "/v1/chat/completions").id, 60)
      assert.are.equal("failed", b.status)
      assert.is_true(has(b.errors.data, "too_many_tasks", 50001))
    end)

    it("applies the test-model rules", function()
      local wrong_url = cjson.encode({ custom_id = "t", method = "POST", url = "/v1/chat/completions",
        body = { model = "batch-test-model", messages = {} } })
      assert.is_true(has(fails({ wrong_url }), "mismatched_test_url", 1))
      local path = H.requests(dir .. "/t101.jsonl", 101)
      local b = H.wait_final(emu, create(emu, upload(emu, path).id).id)
      assert.are.equal("failed", b.status)
      assert.is_true(has(b.errors.data, "test_model_too_many_lines"))
      path = H.requests(dir .. "/t1mb.jsonl", 60, { content = function() return ("y"):rep(20000) end })
      b = H.wait_final(emu, create(emu, upload(emu, path).id).id)
      assert.is_true(has(b.errors.data, "test_model_file_too_large"))
    end)

    it("runs at most 2 test-model batches at once", function()
      local fid = upload(emu, H.requests(dir .. "/slowtest.jsonl", 2)).id
      local slow = { metadata = { emulator_line_seconds = "2000" } }  -- 10 s each at speed 200
      local a, b = create(emu, fid, nil, slow), create(emu, fid, nil, slow)
      H.sleep(0.3)
      local c = H.wait_final(emu, create(emu, fid).id)
      assert.are.equal("failed", c.status)
      assert.is_true(has(c.errors.data, "test_model_concurrency"))
      H.json("POST", emu.base .. "/batches/" .. a.id .. "/cancel")
      H.json("POST", emu.base .. "/batches/" .. b.id .. "/cancel")
      H.wait_final(emu, a.id)
      H.wait_final(emu, b.id)
    end)
  end)

  describe("execution", function()
    it("answers the test model, chat models and embeddings in the service's line format", function()
      local b = H.wait_final(emu, create(emu, upload(emu, H.requests(dir .. "/x.jsonl", 2)).id).id)
      for _, l in ipairs(content(emu, b.output_file_id)) do
        assert.is_string(l.id)
        assert.are.equal(200, l.response.status_code)
        assert.is_string(l.response.request_id)
        assert.are.equal(cjson.null, l.error)
        assert.are.equal("This is a test result.", l.response.body.choices[1].message.content)
        assert.are.equal("chat.completion", l.response.body.object)
      end
      local path = H.requests(dir .. "/chat.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })
      local fid = upload(emu, path).id
      local b1 = H.wait_final(emu, create(emu, fid, "/v1/chat/completions").id)
      local b2 = H.wait_final(emu, create(emu, fid, "/v1/chat/completions").id)
      local o1, o2 = content(emu, b1.output_file_id), content(emu, b2.output_file_id)
      assert.are.equal(o1[1].response.body.choices[1].message.content, o2[1].response.body.choices[1].message.content)
      assert.matches("question 1", o1[1].response.body.choices[1].message.content)
      local u = o1[1].response.body.usage
      assert.is_true(u.prompt_tokens > 0 and u.completion_tokens > 0)
      assert.are.equal(u.prompt_tokens + u.completion_tokens, u.total_tokens)
      local emb = H.requests(dir .. "/emb.jsonl", 2, { line = function(i)
        return { custom_id = "e" .. i, method = "POST", url = "/v1/embeddings",
                 body = { model = "text-embedding-v4", input = "text " .. i, dimensions = 16 } }
      end })
      local eb = H.wait_final(emu, create(emu, upload(emu, emb).id, "/v1/embeddings").id)
      local e = content(emu, eb.output_file_id)
      assert.are.equal(16, #e[1].response.body.data[1].embedding)
      assert.are_not.same(e[1].response.body.data[1].embedding, e[2].response.body.data[1].embedding)
    end)

    it("fails the lines that carry the failure marker into the error file", function()
      local path = H.requests(dir .. "/m.jsonl", 4, { content = function(i)
        return i % 2 == 0 and "please lbatch-emulator:fail" or "fine"
      end })
      local b = H.wait_final(emu, create(emu, upload(emu, path).id).id)
      assert.are.equal("completed", b.status)
      assert.are.same({ total = 4, completed = 2, failed = 2 }, b.request_counts)
      local errs = content(emu, b.error_file_id)
      assert.are.same({ "req-2", "req-4" }, { errs[1].custom_id, errs[2].custom_id })
      assert.are.equal(400, errs[1].response.status_code)
      assert.are.equal("emulated_failure", errs[1].response.body.error.code)
      assert.are.equal("emulated_failure", errs[1].error.code)
      assert.are.equal(2, #content(emu, b.output_file_id))
    end)
  end)

  describe("cancel and expiry", function()
    it("cancels: finished lines stay in the output, the rest fail as batch_cancelled", function()
      local fid = upload(emu, H.requests(dir .. "/cx.jsonl", 20)).id
      -- 20 lines of 40 service seconds: 4 real seconds at speed 200 (the cancel goes at 0.6 s: a loaded
      -- machine's slow polls do not let the batch end first)
      local b = create(emu, fid, nil, { metadata = { emulator_line_seconds = "40" } })
      repeat
        local _
        _, b = H.json("GET", emu.base .. "/batches/" .. b.id)
        H.sleep(0.05)
      until b.status == "in_progress" and b.request_counts.completed >= 3
      local status, c = H.json("POST", emu.base .. "/batches/" .. b.id .. "/cancel")
      assert.are.equal(200, status)
      assert.are.equal("cancelling", c.status)
      b = H.wait_final(emu, b.id)
      assert.are.equal("cancelled", b.status)
      assert.is_number(b.cancelling_at)
      assert.is_number(b.cancelled_at)
      local out, errs = content(emu, b.output_file_id), content(emu, b.error_file_id)
      assert.are.equal(20, #out + #errs)
      assert.is_true(#out >= 3 and #out < 20)
      assert.are.equal("batch_cancelled", errs[#errs].error.code)
      assert.are.equal(cjson.null, errs[#errs].response)
      assert.are.same({ total = 20, completed = #out, failed = #errs }, b.request_counts)
      status = H.json("POST", emu.base .. "/batches/" .. b.id .. "/cancel")
      assert.are.equal(409, status)
    end)

    it("expires a batch not finished within its window, keeping its partial output", function()
      local fid = upload(emu, H.requests(dir .. "/ex.jsonl", 10)).id
      -- 10 lines of 5 service hours: 5 lines fit in a 24h window
      local b = create(emu, fid, nil, { metadata = { emulator_line_seconds = "18000" } })
      repeat
        local _
        _, b = H.json("GET", emu.base .. "/batches/" .. b.id)
        H.sleep(0.05)
      until b.status == "in_progress"
      local status = H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 25 * 3600 } })
      assert.are.equal(200, status)
      b = H.wait_final(emu, b.id)
      assert.are.equal("expired", b.status)
      assert.is_number(b.expired_at)
      local out, errs = content(emu, b.output_file_id), content(emu, b.error_file_id)
      assert.are.equal(10, #out + #errs)
      assert.is_true(#out >= 4 and #out <= 5)
      assert.are.equal("batch_expired", errs[1].error.code)
    end)
  end)

  describe("callback", function()
    it("POSTs the final batch to a loopback ds_batch_finish_callback", function()
      local socket = require "socket"
      local server = assert(socket.bind("127.0.0.1", 0))
      local _, port = server:getsockname()
      server:settimeout(10)
      local fid = upload(emu, H.requests(dir .. "/cb.jsonl", 1)).id
      local b = create(emu, fid, nil, { metadata = { ds_batch_finish_callback = "http://127.0.0.1:" .. port .. "/done" } })
      local conn = assert(server:accept())
      conn:settimeout(5)
      local request_line = conn:receive("*l")
      local length
      repeat
        local l = conn:receive("*l")
        length = length or tonumber((l or ""):match("^[Cc]ontent%-[Ll]ength:%s*(%d+)"))
      until l == "" or l == nil
      local body = conn:receive(length)
      conn:send("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
      conn:close()
      server:close()
      assert.are.equal("POST /done HTTP/1.1", request_line)
      local got = cjson.decode(body)
      assert.are.equal(b.id, got.id)
      assert.are.equal("completed", got.status)
    end)
  end)

  describe("faults and stats", function()
    local function fault(rule)
      assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/faults", { json = rule })))
    end

    it("injects a status with Retry-After for the next N matching requests", function()
      fault({ method = "GET", path = "^/v1/files$", status = 429, retry_after = 7, times = 2 })
      for _ = 1, 2 do
        local status, body, headers = H.json("GET", emu.base .. "/files")
        assert.are.equal(429, status)
        assert.are.equal("7", headers["retry-after"])
        assert.is_true(is_error_shape(body))
      end
      assert.are.equal(200, (H.json("GET", emu.base .. "/files")))
      fault({ path = "^/v1/files$", status = 500 })
      local status, body = H.json("GET", emu.base .. "/files")
      assert.are.equal(500, status)
      assert.is_true(is_error_shape(body))
    end)

    it("delays, closes, truncates and corrupts responses", function()
      fault({ path = "^/v1/files$", delay = 0.5 })
      local t0 = H.now()
      assert.are.equal(200, (H.json("GET", emu.base .. "/files")))
      assert.is_true(H.now() - t0 >= 0.45)
      fault({ path = "^/v1/files$", mode = "close" })
      local _, _, _, rc = H.http("GET", emu.base .. "/files")
      assert.are.equal(52, rc)   -- empty reply
      fault({ path = "^/v1/files$", mode = "truncate" })
      _, _, _, rc = H.http("GET", emu.base .. "/files")
      assert.are.equal(18, rc)   -- partial body
      fault({ path = "^/v1/files$", mode = "invalid_json" })
      local status, body = H.http("GET", emu.base .. "/files")
      assert.are.equal(200, status)
      assert.is_false(pcall(cjson.decode, body))
    end)

    it("counts requests per route", function()
      local _, before = H.json("GET", emu.url .. "/_emulator/stats")
      H.json("GET", emu.base .. "/batches/batch_x")
      H.json("GET", emu.base .. "/batches/batch_y")
      local _, after = H.json("GET", emu.url .. "/_emulator/stats")
      assert.are.equal((before.routes["GET /batches/{id}"] or 0) + 2, after.routes["GET /batches/{id}"])
    end)
  end)

  describe("persistence", function()
    it("keeps files and batches across a restart on the same data directory", function()
      local data = H.tmpdir()
      local e1 = H.emulator({ speed = 200, data = data })
      local f = upload(e1, H.requests(dir .. "/p.jsonl", 2))
      local b = H.wait_final(e1, create(e1, f.id).id)
      local slow = create(e1, f.id, nil, { metadata = { emulator_line_seconds = "100" } })
      e1.stop()
      assert.is_false(e1.alive())
      local e2 = H.emulator({ speed = 200, data = data })
      local _, f2 = H.json("GET", e2.base .. "/files/" .. f.id)
      local _, b2 = H.json("GET", e2.base .. "/batches/" .. b.id)
      assert.are.same(f, f2)
      assert.are.equal("completed", b2.status)
      assert.are.equal(2, #content(e2, b2.output_file_id))
      local s2 = H.wait_final(e2, slow.id)       -- the running one finishes after the restart
      assert.are.equal("completed", s2.status)
      e2.stop()
    end)
  end)
end)

describe("emulator (openai dialect)", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, dialect = "openai", api_key = "only-this-key" })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  it("accepts only the configured key", function()
    assert.are.equal(401, (H.json("GET", emu.base .. "/files", { key = "other" })))
    assert.are.equal(200, (H.json("GET", emu.base .. "/files", { key = "only-this-key" })))
  end)

  it("takes only 24h, lists [] when empty, leaves absent fields out and serves any file", function()
    local k = { key = "only-this-key" }
    local _, page = H.json("GET", emu.base .. "/batches", k)
    assert.are.equal(0, #page.data)
    assert.is_truthy(H.http("GET", emu.base .. "/batches", k))
    local _, raw = H.http("GET", emu.base .. "/batches", k)
    assert.matches('"data":%[%]', raw)
    local _, f = H.json("POST", emu.base .. "/files",
      { key = "only-this-key", form = { "purpose=batch", "file=@" .. H.requests(dir .. "/o.jsonl", 1) } })
    local status, body = H.json("POST", emu.base .. "/batches", { key = "only-this-key",
      json = { input_file_id = f.id, endpoint = "/v1/chat/completions", completion_window = "48h" } })
    assert.are.equal(400, status)
    assert.are.equal("invalid_completion_window", body.error.code)
    local _, b = H.json("POST", emu.base .. "/batches", { key = "only-this-key",
      json = { input_file_id = f.id, endpoint = "/v1/chat/completions", completion_window = "24h" } })
    assert.is_nil(b.output_file_id)
    assert.is_nil(b.in_progress_at)
    local c = H.http("GET", emu.base .. "/files/" .. f.id .. "/content", k)
    assert.are.equal(200, c)
  end)

  it("serves Range requests on content", function()
    local path = H.requests(dir .. "/r.jsonl", 3)
    local text = H.read(path)
    local _, f = H.json("POST", emu.base .. "/files",
      { key = "only-this-key", form = { "purpose=batch", "file=@" .. path } })
    local status, body, headers = H.http("GET", emu.base .. "/files/" .. f.id .. "/content",
      { key = "only-this-key", headers = { "Range: bytes=10-19" } })
    assert.are.equal(206, status)
    assert.are.equal(text:sub(11, 20), body)
    assert.are.equal("application/octet-stream", headers["content-type"])
  end)
end)

describe("emulator process", function()
  it("prints its address, and SIGTERM leaves no nginx behind", function()
    local emu = H.emulator({ speed = 1 })
    assert.matches("listening on http://127.0.0.1:" .. emu.port, H.read(emu.log))
    local children = H.sh("pgrep -P " .. emu.pid)
    assert.is_truthy(children:match("%d+"))
    emu.stop()
    assert.is_false(emu.alive())
    for pid in children:gmatch("%d+") do assert.is_false(H.ok("kill -0 " .. pid .. " 2>/dev/null")) end
  end)
end)
