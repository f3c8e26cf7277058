-- The real service's recorded answers (spec/fixtures/recorded, see its
-- README): the client run against them replayed byte for byte, and the
-- emulator's answers held against them field by field (keys at every
-- level, JSON types, nulls, fixed values, content type).
local H = require "helper"
local lbatch = require "lbatch"
local cjson = require "cjson"

local DIR = H.root .. "/spec/fixtures/recorded/dashscope/"

local function recorded(name)
  local body = assert(H.read(DIR .. name .. "-compatible.response.body.txt"))
  local head = assert(H.read(DIR .. name .. "-compatible.response.header.txt"))
  body = body:gsub("^\239\187\191", "")                      -- one answer starts with a BOM
  return cjson.decode(body), head:match("\n[Cc]ontent%-[Tt]ype: *([^\r\n]+)")
end

-- a value's JSON type; numbers as integer or number (lua-cjson decodes
-- both as floats on 5.4), and an empty table as "empty" ({} and [] alike)
local jtype = H.jtype

-- an id's form: its hex digits as x (batch_…-uuid, file-batch- and 24 hex digits)
local function form(s) return (s:gsub("%x", "x")) end

-- What may differ between the service's answer and the emulator's, by key:
-- ids ("id": the same form), times and whatever the run decides ("any": the
-- same type). Every other value is held equal.
local VARY = { id = "id", input_file_id = "id", output_file_id = "id", error_file_id = "id",
               first_id = "id", last_id = "id", request_id = "id", created = "any" }

-- the differences between a recorded value and the emulator's: keys at every
-- level, JSON types, nulls, values (but VARY's and `vary`'s), and the times
-- the record shows equal (finalizing_at = completed_at, ...) equal
local function differences(want, got, vary, path, out)
  out, path = out or {}, path or ""
  local wt, gt = jtype(want), got == nil and "absent" or jtype(got)
  local key = path:match("([^.]+)$") or ""
  local kind = vary and vary[key] or VARY[key] or (key:match("_at$") and "any")
  if wt ~= gt then
    out[#out + 1] = ("%s: %s in the record, %s from the emulator"):format(path, wt, gt)
  elseif wt == "object" then
    for k, w in pairs(want) do differences(w, got[k], vary, path .. "." .. k, out) end
    for k in pairs(got) do
      if want[k] == nil then out[#out + 1] = ("%s.%s: not in the record"):format(path, k) end
    end
    for a, x in pairs(want) do
      for b, y in pairs(want) do
        if a < b and a:match("_at$") and b:match("_at$") and x ~= cjson.null and x == y and got[a] ~= got[b] then
          out[#out + 1] = ("%s: %s = %s in the record, not from the emulator"):format(path, a, b)
        end
      end
    end
  elseif wt == "array" then
    if #want ~= #got then
      out[#out + 1] = ("%s: %d items in the record, %d from the emulator"):format(path, #want, #got)
    end
    for i = 1, math.min(#want, #got) do differences(want[i], got[i], vary, path .. "[" .. i .. "]", out) end
  elseif kind == "id" and wt == "string" then
    if form(want) ~= form(got) then out[#out + 1] = ("%s: %s recorded, %s emulated"):format(path, want, got) end
  elseif kind ~= "any" and want ~= got then
    out[#out + 1] = ("%s: %s recorded, %s emulated"):format(path, tostring(want), tostring(got))
  end
  return out
end

-- a UTC+8 time as the service's list filters take it (yyyyMMddHHmmss, or yyyyMMdd)
local function beijing(t, fmt) return os.date("!" .. (fmt or "%Y%m%d%H%M%S"), math.floor(t) + 8 * 3600) end

describe("the client against the service's recorded answers, replayed byte for byte", function()
  local srv, c
  setup(function()
    srv = H.hostile()
    c = lbatch.new({ api_key = "sk-replay", base_url = srv.at("replay"), max_retries = 0 })
  end)
  teardown(function() c:close() srv.stop() end)

  it("creates a batch: every stamp null, the metadata's Chinese as sent", function()
    local b = assert(c:create({ input_file_id = "file-batch-61875e1242854691b8bfd17d", endpoint = "/v1/chat/ds-test",
      metadata = { ds_name = "测试任务", ds_description = "任务描述", ds_batch_finish_callback = "https://www.cnblogs.com" } }))
    assert.are.same({ "batch_fa05d570-fa04-4935-8b80-2b9c1a4b3ee4", "validating", "测试任务" },
      { b.id, b.status, b.metadata.ds_name })
    assert.is_nil(b.expires_at)
    assert.is_nil(b.errors)
    assert.are.same({ total = 0, completed = 0, failed = 0 }, b.request_counts)
  end)

  it("reads a batch in progress, a completed one, and one that failed validation", function()
    local b = assert(c:retrieve("batch_2ecfc43e-439e-4443-bfe8-9a36b89456d0"))
    assert.are.equal("in_progress", b.status)
    assert.are.equal(math.type and "integer" or "number", math.type and math.type(b.in_progress_at) or type(b.in_progress_at))
    b = assert(c:retrieve("batch_5b57e198-203e-49c8-bcc3-65e997d51754"))
    assert.are.same({ "completed", 2, 2, 0 }, { b.status, b.request_counts.total, b.request_counts.completed,
                                                 b.request_counts.failed })
    assert.are.equal("file-batch_output-c5f57bf1fbc749cdae9676ba", b.output_file_id)
    assert.is_nil(b.error_file_id)
    assert.is_true(lbatch.FINAL[b.status])
    b = assert(c:retrieve("batch_fa05d570-fa04-4935-8b80-2b9c1a4b3ee4"))
    assert.are.equal("failed", b.status)
    assert.are.same({ "url_not_found", "The provided url '/v1/chat/completion' is not supported by the Batch API.", 1 },
      { b.errors.data[1].code, b.errors.data[1].message, b.errors.data[1].line })
    assert.are.equal(b.created_at, b.failed_at)
  end)

  it("lists batches with every filter the service records, and an empty list as an empty page", function()
    local p = assert(c:list_batches({ limit = 2, input_file_ids = { "hello" } }))
    assert.are.same({}, p.data)
    assert.is_false(p.has_more)
    p = assert(c:list_batches({ limit = 2, status = { "completed", "cancelled" }, create_after = "20260417180000" }))
    assert.are.equal("batch_5b57e198-203e-49c8-bcc3-65e997d51754", p.data[1].id)
    p = assert(c:list_batches({ limit = 2, ds_name = "任务" }))
    assert.is_true(#p.data >= 1)
    p = assert(c:list_batches({ create_after = "20260417162000", create_before = "20260417170000" }))
    assert.is_true(#p.data >= 1)
    p = assert(c:list_batches({ input_file_ids = { "file-batch-c015426ce301481bb13c76b4",
                                                   "file-batch-c015426ce301481bb13c76b4" } }))
    assert.are.equal("file-batch-c015426ce301481bb13c76b4", p.data[1].input_file_id)
  end)

  it("lists files (an answer that begins with a byte order mark), reads, deletes, downloads and uploads", function()
    local p = assert(c:list_files({ after = "file-fe-e457d4773c3f4c9fbfadffaf", limit = 3, create_after = "20250101",
                                    create_before = "20251101", purpose = "file-extract" }))
    assert.are.same({ "file-fe-d5c0ea9110bd47afb0505f43", false }, { p.data[1].id, p.has_more })
    local f = assert(c:file("file-fe-d5c0ea9110bd47afb0505f43"))
    assert.are.same({ "file", 1314, "processed" }, { f.object, f.bytes, f.status })
    local d = assert(c:delete_file("file-fe-d5c0ea9110bd47afb0505f43"))
    assert.is_true(d.deleted)
    local text = assert(c:content("file-batch_output-c5f57bf1fbc749cdae9676ba"))
    local line = cjson.decode(text:match("[^\n]+"))
    assert.are.equal("1", line.custom_id)
    local dir = H.tmpdir()
    local path = dir .. "/test2.txt"
    H.write(path, "hello\n\n")
    local up = assert(c:upload(path, { purpose = "file-extract" }))
    assert.are.same({ "file-fe-5d5eb068893f4b5e8551ada4", 7 }, { up.id, up.bytes })
  end)
end)


describe("the emulator (dashscope dialect) beside every recorded answer, field by field", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  -- the emulator's raw answer (curl, not lbatch: nothing normalized)
  local function raw(method, path, opts)
    local status, body, headers = H.json(method, emu.base .. path, opts)
    assert.are.equal(200, status, type(body) == "string" and body or cjson.encode(body))
    return body, headers["content-type"]
  end

  -- the emulator's answer held against the record NAME (or its part `part`)
  local function check(name, got, got_type, vary, part)
    local want, want_type = recorded(name)
    if part then want = part(want) end
    assert.are.same({}, differences(want, got, vary))
    if got_type ~= false then assert.are.equal(want_type, got_type) end
    return want
  end

  local META = { ds_name = "测试任务", ds_description = "任务描述", ds_batch_finish_callback = "https://www.cnblogs.com" }
  local KNOB = "emulator_line_seconds"        -- the emulator's own, set aside before comparing

  local function upload(name, text, purpose)
    local path = H.mkdir(dir .. "/" .. H.now() * 1e6) .. "/" .. name
    H.write(path, text)
    return raw("POST", "/files", { form = { "purpose=" .. purpose, "file=@" .. path } })
  end

  -- an input file of the requests the recorded batches ran: custom_id 1 and 2, qwen-flash
  local function input(url, n)
    local lines = {}
    for i = 1, n or 2 do
      lines[i] = cjson.encode({ custom_id = tostring(i), method = "POST", url = url,
        body = { model = "qwen-flash", messages = { { role = "user", content = "hi " .. i } } } })
    end
    return (upload("input.jsonl", table.concat(lines, "\n") .. "\n", "batch"))
  end

  local function create(file_id, endpoint, meta)
    return raw("POST", "/batches", { json = { input_file_id = file_id, endpoint = endpoint,
                                              completion_window = "24h", metadata = meta } })
  end

  local function until_status(id, want)
    local b = H.wait_status(emu, id, want)
    assert.are.equal(want, b.status)
    return b
  end

  local function without_knob(b)
    if type(b) == "table" and type(b.metadata) == "table" and b.metadata[KNOB] then
      b.metadata[KNOB] = nil
    end
    return b
  end

  -- moves the emulator's clock on by `seconds` (so batches fall into different seconds)
  local function later(seconds)
    assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = seconds * 200 } })))
  end

  it("files: an upload of file-extract, retrieve, the list by date, cursor and purpose, delete", function()
    local old = upload("file1.txt", ("x"):rep(1313) .. "\n", "file-extract")
    local got, ct = raw("GET", "/files/" .. old.id)
    check("get-file", got, ct)
    local new
    new, ct = upload("test2.txt", "hello\n\n", "file-extract")
    check("upload-file", new, ct)
    assert(upload("other.jsonl", H.read(H.requests(dir .. "/r.jsonl", 1)), "batch"))
    -- as recorded: after=…&limit=3&create_after=yyyyMMdd&create_before=yyyyMMdd&purpose=file-extract
    local q = "/files?after=%s&limit=3&create_after=%s&create_before=%s&purpose=file-extract"
    got, ct = raw("GET", q:format(new.id, beijing(old.created_at, "%Y%m%d"), beijing(old.created_at + 86400, "%Y%m%d")))
    check("list-files", got, ct)
    assert.are.equal(old.id, got.data[1].id)
    got = raw("GET", q:format(new.id, beijing(old.created_at + 86400, "%Y%m%d"), beijing(old.created_at + 86400, "%Y%m%d")))
    assert.are.same({}, got.data)
    got, ct = raw("DELETE", "/files/" .. old.id)
    check("delete-file", got, ct)
  end)

  local failed
  it("a new batch (every stamp null), failed validation, and the list by time in UTC+8", function()
    local f = input("/v1/chat/completion", 1)
    later(2)
    local b, ct = create(f.id, "/v1/chat/ds-test", META)
    check("create-batch", b, ct)
    later(2)
    until_status(b.id, "failed")
    local got
    got, ct = raw("GET", "/batches/" .. b.id)
    check("get-invalid-batch", got, ct)
    failed = got
    -- as recorded: create_after and create_before, Beijing time, no limit
    local q = "/batches?create_after=%s&create_before=%s"
    got, ct = raw("GET", q:format(beijing(b.created_at), beijing(b.created_at)))
    check("list-batches-filter-by-time", got, ct)
    got = raw("GET", q:format(beijing(b.created_at + 1), beijing(b.created_at + 3600)))
    assert.are.equal(cjson.null, got.data)
    got = raw("GET", q:format(beijing(b.created_at - 3600), beijing(b.created_at - 1)))
    assert.are.equal(cjson.null, got.data)
  end)

  local older, cancelled, completed, input_id
  it("a batch in progress, cancelled (cancelling_at = cancelled_at), one completed and its output's lines", function()
    older = create(input("/v1/chat/completions").id, "/v1/chat/completions", META)
    assert(until_status(older.id, "completed"))
    later(2)
    input_id = input("/v1/chat/completions").id
    local meta = { [KNOB] = "100000" }
    for k, v in pairs(META) do meta[k] = v end
    local b = create(input_id, "/v1/chat/completions", meta)
    later(2)                   -- (lands within validation: a later in_progress_at would show)
    until_status(b.id, "in_progress")
    local got, ct = raw("GET", "/batches/" .. b.id)
    assert.are.equal("100000", got.metadata[KNOB])
    check("get-inprogress-batch", without_knob(got), ct)
    -- cancel, and the clock 2 s on at once (one curl): a later cancelled_at would show
    H.sh(("curl -s -o /dev/null %s -X POST -H 'Authorization: Bearer k' %s --next -s -o /dev/null %s -X POST "
      .. "-H 'Content-Type: application/json' --data '{\"advance\":400}' %s"):format(
      emu.tls and "--cacert " .. H.q(emu.tls) or "", H.q(emu.base .. "/batches/" .. b.id .. "/cancel"),
      emu.tls and "--cacert " .. H.q(emu.tls) or "", H.q(emu.url .. "/_emulator/clock")))
    cancelled = without_knob(until_status(b.id, "cancelled"))
    -- the service's cancelled batch is recorded in its lists
    check("list-batches-filter-by-input-file-id", cancelled, false, nil, function(l) return l.data[2] end)
    later(2)
    b = create(input_id, "/v1/chat/completions", META)
    until_status(b.id, "completed")
    got, ct = raw("GET", "/batches/" .. b.id)
    check("get-completed-batch", got, ct)
    completed = got
    local _, text, headers = H.http("GET", emu.base .. "/files/" .. got.output_file_id .. "/content")
    local lines = {}
    for line in text:gmatch("[^\n]+") do lines[#lines + 1] = cjson.decode(line) end
    local rec = {}
    for line in H.read(DIR .. "get-file-content-compatible.response.body.txt"):gmatch("[^\n]+") do
      rec[#rec + 1] = cjson.decode(line)
    end
    assert.are.same({}, differences(rec, lines, { content = "any", completion_tokens = "any",
                                                  prompt_tokens = "any", total_tokens = "any" }))
    for _, l in ipairs(lines) do       -- one uuid: the line's, the request's, the completion's
      assert.are.same({ l.id, "chatcmpl-" .. l.id }, { l.response.request_id, l.response.body.id })
    end
    local want_type = H.read(DIR .. "get-file-content-compatible.response.header.txt"):match("\n[Cc]ontent%-[Tt]ype:")
    assert.are.equal(want_type, headers["content-type"])        -- none
  end)

  it("lists: empty, by input_file_ids, by status and create_after (UTC+8), by ds_name", function()
    assert(completed and cancelled and failed, "needs the batches of the cases before")
    local function list(q)
      local got, ct = raw("GET", "/batches?" .. q)
      if got.data ~= cjson.null then for _, b in ipairs(got.data) do without_knob(b) end end
      return got, ct
    end
    check("list-batches-empty", list("limit=2&input_file_ids=hello"))
    local got, ct = list("input_file_ids=" .. input_id .. "%2C" .. input_id)
    check("list-batches-filter-by-input-file-id", got, ct)
    assert.are.same({ completed.id, cancelled.id }, { got.data[1].id, got.data[2].id })
    got, ct = list("limit=2&status=completed%2Ccancelled&create_after=" .. beijing(older.created_at))
    check("list-batches-search-status", got, ct)
    assert.are.same({ completed.id, cancelled.id }, { got.data[1].id, got.data[2].id })
    got, ct = list("limit=2&ds_name=%E4%BB%BB%E5%8A%A1")
    check("list-batches-search-ds-name", got, ct)
    assert.are.same({ completed.id, cancelled.id }, { got.data[1].id, got.data[2].id })
  end)
end)
