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

-- a value's shape: each object's keys with their shapes, an array's first
-- element's, "null", or the JSON type
local function shape(v)
  if v == cjson.null then return "null" end
  if type(v) ~= "table" then return type(v) end
  if next(v) == nil then return "empty" end
  if #v > 0 then return { shape(v[1]) } end
  local t = {}
  for k, x in pairs(v) do t[k] = shape(x) end
  return t
end

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

describe("the emulator beside the recorded service, field by field", function()
  local emu, c, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    c = lbatch.new({ api_key = "k", base_url = emu.base })
    dir = H.tmpdir()
  end)
  teardown(function() c:close() emu.stop() end)

  -- the emulator's raw answer (curl, not lbatch: nothing normalized)
  local function raw(method, path, opts)
    local status, body, headers = H.json(method, emu.base .. path, opts)
    return status, body, headers
  end

  local function content_type(path)
    local out = H.sh(("curl -s -o /dev/null -D - -H 'Authorization: Bearer k' %s"):format(H.q(emu.base .. path)))
    return out:match("\n[Cc]ontent%-[Tt]ype: *([^\r\n]+)")
  end

  local function test_batch(url, meta)
    local path = dir .. "/t-" .. url:gsub("%W", "") .. ".jsonl"
    H.write(path, cjson.encode({ custom_id = "1", method = "POST", url = url,
      body = { model = "batch-test-model", messages = { { role = "user", content = "hi" } } } }) .. "\n")
    local f = assert(c:upload(path))
    local _, b = raw("POST", "/batches", { json = { input_file_id = f.id, endpoint = "/v1/chat/ds-test",
      completion_window = "24h", metadata = meta } })
    return b
  end

  local META = { ds_name = "测试任务", ds_description = "任务描述", ds_batch_finish_callback = "https://www.cnblogs.com" }

  it("a new batch: the same keys, types and nulls, metadata echoed, the service's content type", function()
    local want, want_type = recorded("create-batch")
    local b = test_batch("/v1/chat/ds-test", META)
    assert.are.same(shape(want), shape(b))
    assert.are.same(want.metadata, b.metadata)
    assert.are.equal(want_type, content_type("/batches/" .. b.id))
  end)

  it("a completed batch and its output file's lines", function()
    local want = recorded("get-completed-batch")
    local b = test_batch("/v1/chat/ds-test", META)
    b = assert(c:wait(b.id, { interval = 0.05 }))
    local _, got = raw("GET", "/batches/" .. b.id)
    assert.are.same(shape(want), shape(got))
    assert.are.equal(got.completed_at, got.finalizing_at)
    local text = assert(c:content(got.output_file_id))
    local line = cjson.decode(text:match("[^\n]+"))
    local rec = H.read(DIR .. "get-file-content-compatible.response.body.txt")
    local want_line = cjson.decode(rec:match("[^\n]+"))
    assert.are.same(shape(want_line), shape(line))
  end)

  it("a batch that failed validation: the service's code, message, line and stamps", function()
    local want = recorded("get-invalid-batch")
    local b = test_batch("/v1/chat/completion", META)
    b = assert(c:wait(b.id, { interval = 0.05 }))
    local _, got = raw("GET", "/batches/" .. b.id)
    assert.are.same(shape(want), shape(got))
    assert.are.same(want.errors.data[1], got.errors.data[1])
    assert.are.equal(got.created_at, got.failed_at)
    assert.are.same(want.request_counts, got.request_counts)
  end)

  it("an empty list, lists by filter, files: the same keys and nulls", function()
    local want = recorded("list-batches-empty")
    local _, got = raw("GET", "/batches?limit=2&input_file_ids=hello")
    assert.are.same(want, got)
    want = recorded("list-batches-search-status")
    assert(c:wait(test_batch("/v1/chat/ds-test", META).id, { interval = 0.05 }))
    local _, all = raw("GET", "/batches?limit=2&status=completed%2Ccancelled")
    assert.are.same(shape(want), shape(all))
    local f = assert(c:upload(H.requests(dir .. "/f.jsonl", 1)))
    local wf = recorded("get-file")
    local _, gf = raw("GET", "/files/" .. f.id)
    assert.are.same(shape(wf), shape(gf))
    local wl = recorded("list-files")
    local _, gl = raw("GET", "/files?limit=1")
    assert.are.same(shape(wl), shape(gl))
    local wu = recorded("upload-file")
    assert.are.same(shape(wu), shape(f))
    local wd = recorded("delete-file")
    local _, gd = raw("DELETE", "/files/" .. f.id)
    assert.are.same(shape(wd), shape(gd))
    assert.is_true(gd.deleted)
  end)
end)
