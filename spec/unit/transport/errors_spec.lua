-- One error contract: every public function meets a failure it can meet
-- (a file that cannot be read or written, a missing directory, a server
-- error, bad JSON) and returns nil (or false, in an iterator) and an error
-- object of one shape. None raises on a runtime failure.
local H = require "helper"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local csv = require "lbatch.csv"
local pipeline = require "lbatch.pipeline"
local journal = require "lbatch.impl.orchestration.journal"
local cli = require "lbatch.cmd.cli"

local KINDS = { http = true, network = true, timeout = true, decode = true, invalid = true, io = true,
                cancelled = true, task = true }

-- the one shape: kind, message, retryable, a one-line tostring
local function shape(err, kind, what)
  assert.is_true(lbatch.is_error(err), what .. ": not an error object: " .. tostring(err))
  assert.is_true(KINDS[err.kind], what)
  assert.are.equal(kind, err.kind, what .. ": " .. tostring(err))
  assert.is_string(err.message, what)
  assert.is_boolean(err.retryable, what)
  for _, k in ipairs({ "code", "param", "request_id", "type" }) do
    assert.is_true(err[k] == nil or type(err[k]) == "string", what .. ": " .. k)
  end
  local s = tostring(err)
  assert.matches("^lbatch: " .. kind, s, 1, what)
  assert.is_nil(s:find("\n"), what)
  if kind == "io" then assert.is_false(err.retryable, what) end
end

-- call fn; it must return (nil or false), err of `kind`, without raising
local function fails(kind, what, fn, ...)
  local ok, v, err = pcall(fn, ...)
  assert.is_true(ok, what .. " raised: " .. tostring(v))
  assert.is_true(v == nil or v == false, what .. " returned " .. tostring(v))
  shape(err, kind, what)
  return err
end

-- the first failure an iterator gives
local function iter_fails(kind, what, it)
  local ok, err = pcall(function()
    for x, e in it do
      if not x then return e end
    end
  end)
  assert.is_true(ok, what .. " raised: " .. tostring(err))
  shape(err, kind, what)
  return err
end

local function fault(emu, rule)
  assert.are.equal(200, (H.json("POST", emu.url .. "/_emulator/faults", { json = rule })))
end

local function stats(emu)
  local _, s = H.json("GET", emu.url .. "/_emulator/stats")
  return type(s.routes) == "table" and s.routes or {}
end

describe("error objects", function()
  local errors = require "lbatch.impl.transport.errors"
  it("name a file once in an io error, though the system's reason names it too", function()
    local path = H.tmpdir() .. "/none.jsonl"
    local _, msg = io.open(path, "rb")
    assert.are.equal(path .. ": No such file or directory", msg)
    local e = errors.io("cannot read", path, msg)
    assert.are.equal("cannot read " .. path .. ": No such file or directory", e.message)
    assert.are.equal("cannot read " .. path .. ": it is a directory", errors.io("cannot read", path, "it is a directory").message)
  end)

  it("write a number code as its digits only where a double holds the number exactly", function()
    local cjson = require "cjson"
    local function code(json) return errors.new({ kind = "http", code = cjson.decode(json).code }).code end
    assert.are.equal("9007199254740991", code('{"code":9007199254740991}'))      -- 2^53 - 1: exact
    assert.are.equal("-9007199254740991", code('{"code":-9007199254740991}'))
    -- 9007199254740993 reads as 2^53: its digits would be another code
    assert.are_not.equal("9007199254740992", code('{"code":9007199254740993}'))
    assert.are_not.equal("-9007199254740992", code('{"code":-9007199254740993}'))
    assert.are.equal("429", code('{"code":429}'))
    assert.are.equal("1.5", code('{"code":1.5}'))
  end)
end)

describe("one error contract", function()
  local emu, dir, client
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)
  before_each(function()
    H.http("DELETE", emu.url .. "/_emulator/faults")
    client = lbatch.new({ api_key = "k", base_url = emu.base, max_retries = 0 })
  end)
  after_each(function() client:close() end)

  it("every client operation", function()
    local input = H.requests(dir .. "/in.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })
    fails("io", "upload of a missing file", client.upload, client, dir .. "/nope.jsonl")
    local e = fails("io", "upload of a directory", client.upload, client, dir)
    assert.matches("directory", e.message)
    fault(emu, { path = "^/v1/files$", status = 500 })
    fails("http", "upload, server error", client.upload, client, input)
    fails("http", "create from a missing file", client.create, client,
      { input_file_id = "file-batch-nope", endpoint = "/v1/chat/completions" })
    fails("http", "retrieve", client.retrieve, client, "batch_nope")
    fails("invalid", "retrieve with a dot-segment id", client.retrieve, client, "..")
    fails("http", "cancel", client.cancel, client, "batch_nope")
    fault(emu, { path = "^/v1/batches$", mode = "invalid_json" })
    fails("decode", "list_batches, bad JSON", client.list_batches, client)
    fault(emu, { path = "^/v1/batches$", status = 500 })
    iter_fails("http", "each_batch", client:each_batch())
    fault(emu, { path = "^/v1/files$", mode = "invalid_json" })
    fails("decode", "list_files, bad JSON", client.list_files, client)
    fault(emu, { path = "^/v1/files$", status = 503 })
    iter_fails("http", "each_file", client:each_file())
    fails("http", "file", client.file, client, "file-nope")
    fails("http", "delete_file", client.delete_file, client, "file-nope")
    fails("http", "content", client.content, client, "file-nope")
    fails("io", "content to a missing directory", client.content, client, "file-nope",
      { path = dir .. "/no/such/dir/out.jsonl" })
    fails("http", "wait", client.wait, client, "batch_nope", { interval = 0.05 })
    local dead = lbatch.new({ api_key = "k", base_url = "http://127.0.0.1:9/v1", max_retries = 0 })
    fails("network", "a server that is not there", dead.list_batches, dead)
    dead:close()
  end)

  it("tasks: join, run and step give the task's error with its traceback", function()
    local t = client:spawn(function() error("boom") end)
    local ok, v, err = pcall(t.join, t)
    assert.is_true(ok)
    assert.is_nil(v)
    shape(err, "task", "join")
    assert.matches("boom", err.message)
    assert.matches("stack traceback", err.traceback)
    client:spawn(function()                 -- raises the error object (busted's assert makes it a string)
      local b, e = client:retrieve("batch_nope")
      if not b then error(e) end
    end)
    local _, rerr = client:run()
    shape(rerr, "http", "run")
    assert.are.equal(404, rerr.status)
    assert.matches("stack traceback", rerr.traceback)
    client:spawn(function() local x = nil; return x.y end)
    local pending, serr
    for _ = 1, 10 do
      pending, serr = client:step()
      if serr then break end
    end
    assert.are.equal(0, pending)
    shape(serr, "task", "step")
  end)

  it("request files: writer, validate, data_url, image", function()
    local w = jsonl.writer({ path = dir .. "/no/such/dir/r.jsonl", model = "m" })
    local e = fails("io", "writer in a missing directory", w.chat, w, "a", { prompt = "x" })
    assert.matches("no/such/dir/r.jsonl", e.message)
    -- a full disk: /dev/full takes the open and fails the writes
    local full = jsonl.writer({ path = "/dev/full", model = "m" })
    assert.is_true(full:chat("a", { prompt = "x" }))
    fails("io", "writer on a full disk", full.close, full)
    fails("io", "validate of a missing file", jsonl.validate, dir .. "/nope.jsonl")
    fails("io", "validate of a directory", jsonl.validate, dir)
    fails("io", "data_url of a missing file", jsonl.data_url, dir .. "/nope.png")
    fails("io", "image of a missing file", jsonl.image, dir .. "/nope.png")
  end)

  it("results: open, each, missing, summary, resubmit", function()
    fails("io", "open with a missing file", results.open, { output = dir .. "/nope.jsonl" })
    local out = H.write(dir .. "/out.jsonl", '{"custom_id":"a","response":{"status_code":200,"body":{}},"error":null}\n')
    local input = H.requests(dir .. "/res-in.jsonl", 1, { prefix = "a" })
    local r = assert(results.open({ output = out, inputs = input }))
    os.remove(out)                     -- gone after open
    iter_fails("io", "each", r:each())
    fails("io", "missing", r.missing, r)
    fails("io", "summary", r.summary, r)
    H.write(out, '{"custom_id":"a1","error":{"code":"batch_expired","message":"x"}}\n')
    fails("io", "resubmit to a missing directory", r.resubmit, r, dir .. "/no/such/dir/again.jsonl")
  end)

  it("csv: rows, writer, to_jsonl, from_results", function()
    fails("io", "rows of a missing file", csv.rows, dir .. "/nope.csv")
    local bad = H.write(dir .. "/bad.csv", 'id,text\na,"never closed\n')
    local e = iter_fails("invalid", "rows with an unterminated quote", (csv.rows(bad)))
    assert.matches("bad.csv:2", e.message)
    fails("io", "writer in a missing directory", csv.writer, dir .. "/no/such/dir/x.csv")
    fails("io", "to_jsonl of a missing file", csv.to_jsonl, dir .. "/nope.csv", { path = dir .. "/x.jsonl", model = "m" })
    fails("invalid", "to_jsonl of a broken CSV", csv.to_jsonl, bad, { path = dir .. "/y.jsonl", model = "m" })
    local out = H.write(dir .. "/ok-out.jsonl", '{"custom_id":"a","response":{"status_code":200,"body":{}},"error":null}\n')
    fails("io", "from_results to a missing directory", csv.from_results, { output = out }, dir .. "/no/such/dir/a.csv")
    fails("io", "from_results of a missing file", csv.from_results, { output = dir .. "/nope.jsonl" }, dir .. "/b.csv")
  end)

  it("pipeline and journal", function()
    local file = H.write(dir .. "/a-file", "x")
    fails("io", "pipeline in a directory that cannot be made", pipeline.run,
      { client = client, requests = {}, dir = file .. "/work" })
    fails("io", "pipeline with missing requests", pipeline.run,
      { client = client, requests = dir .. "/nope.jsonl", dir = dir .. "/p1" })
    fault(emu, { path = "^/v1/files$", status = 500 })
    fails("http", "pipeline, server error", pipeline.run, { client = client, dir = dir .. "/p2",
      requests = { { custom_id = "a", body = { model = "qwen-plus", messages = { { role = "user", content = "x" } } } } } })
    fails("io", "journal in a missing directory", journal.open, dir .. "/no/such/dir/j.jsonl")
  end)

  it("the command: exit 1 and one line, never a Lua traceback", function()
    local function run(args)
      local ok, code = pcall(cli.main, args)
      assert.is_true(ok, tostring(code))
      return code
    end
    assert.are.equal(1, run({ "validate", dir .. "/nope.jsonl" }))
    assert.are.equal(1, run({ "results", dir .. "/nope.jsonl" }))
    assert.are.equal(2, run({ "list", "--limit", "many" }))
  end)

  it("a download whose target cannot be renamed into fails once, as io, not retried", function()
    local openai = H.emulator({ speed = 200, dialect = "openai" })
    local c = lbatch.new({ api_key = "k", base_url = openai.base, max_retries = 3 })
    local f = assert(c:upload(H.requests(dir .. "/dl.jsonl", 5)))
    local target = dir .. "/dl-target.jsonl"
    -- the answer waits a second; meanwhile the target becomes a directory
    fault(openai, { path = "/content$", delay = 1 })
    local before = stats(openai)["GET /files/{id}/content"] or 0
    c:spawn(function() c:sleep(0.3) H.ok("mkdir " .. target) end)
    local v, err = c:content(f.id, { path = target })
    assert.is_nil(v)
    shape(err, "io", "download")
    assert.matches(target, err.message, 1, true)
    assert.are.equal(before + 1, stats(openai)["GET /files/{id}/content"])
    assert.are.equal("", H.sh("ls -A " .. target))            -- nothing left inside
    assert.are.equal("", H.sh("ls " .. dir .. " | grep part-"))  -- nor beside it
    c:close()
    openai.stop()
  end)
end)
