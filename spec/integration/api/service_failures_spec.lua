-- The service as users meet it, on the client's side: a download cut
-- midway goes on from the bytes already on disk, a fresh id that is not
-- there yet is asked again, and the upload's file part is typed as the
-- SDKs type it (checked on the raw request).
local H = require "helper"
local lbatch = require "lbatch"

local function fault(emu, rule)
  local status = H.json("POST", emu.url .. "/_emulator/faults", { json = rule, cacert = emu.tls })
  assert.are.equal(200, status)
end

local function literal(s) return (s:gsub("%p", "%%%0")) end

local function last(emu) return (select(2, H.json("GET", emu.url .. "/_emulator/last", { cacert = emu.tls }))) end

local function partials(dir)
  return (H.sh("ls -A " .. H.q(dir) .. " | grep -c part- || true"):gsub("%s+", ""))
end

describe("a cut download", function()
  local emu, c, dir, file, whole
  setup(function()
    emu = H.emulator({ speed = 200 })
    c = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    dir = H.tmpdir()
    local input = assert(c:upload(H.requests(dir .. "/in.jsonl", 2000,
                                             { url = "/v1/chat/completions", model = "qwen-plus" })))
    local b = assert(c:create({ input_file_id = input.id, endpoint = "/v1/chat/completions" }))
    b = assert(c:wait(b.id, { interval = 0.1, factor = 1 }))
    file = assert(c:file(b.output_file_id))
    whole = assert(c:content(file.id))
    assert.is_true(#whole > 100000)
  end)
  teardown(function() c:close() emu.stop() end)

  it("resumes with Range from the bytes on disk and ends byte-identical, with no temp file left", function()
    fault(emu, { path = "/files/[^/]+/content$", mode = "truncate", times = 1 })
    local out = dir .. "/out.jsonl"
    assert.are.equal(out, assert(c:content(file.id, { path = out })))
    assert.are.equal(whole, H.read(out))
    local l = last(emu)
    local from = tonumber((l.headers.range or ""):match("^bytes=(%d+)%-$"))
    assert.is_truthy(from, "the second request asks for a range: " .. tostring(l.headers.range))
    assert.is_true(from > 0 and from < file.bytes)
    assert.are.equal("0", partials(dir))
  end)

  it("removes the kept bytes when the retries run out, and leaves the destination as it was", function()
    local out = H.write(dir .. "/out3.jsonl", "before\n")
    fault(emu, { path = "/files/[^/]+/content$", mode = "truncate", times = 10 })
    local v, err = c:content(file.id, { path = out, max_retries = 2 })
    assert.is_nil(v)
    assert.are.equal("network", err.kind)
    assert.are.equal("before\n", H.read(out))
    assert.are.equal("0", partials(dir))
    H.json("DELETE", emu.url .. "/_emulator/faults", { cacert = emu.tls })
  end)

  it("removes the kept bytes when its task is cancelled between attempts", function()
    local out = dir .. "/out4.jsonl"
    fault(emu, { path = "/files/[^/]+/content$", mode = "truncate", times = 1 })
    local t = c:spawn(function() return c:content(file.id, { path = out }) end)
    c:spawn(function()
      for _ = 1, 200 do
        if partials(dir) ~= "0" then break end    -- the cut attempt kept its bytes: now in the backoff
        c:sleep(0.01)
      end
      t:cancel()
    end)
    assert(c:run())
    assert.are.equal("0", partials(dir))
    assert.is_false(H.exists(out))
  end)
end)

describe("a fresh id", function()
  local emu, c, dir, f
  setup(function()
    emu = H.emulator({ speed = 200 })
    c = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
    dir = H.tmpdir()
    f = assert(c:upload(H.requests(dir .. "/in.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })))
  end)
  teardown(function() c:close() emu.stop() end)

  it("made by this client a moment ago: its 404s are asked again until it is there", function()
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    fault(emu, { path = "/batches/" .. literal(b.id) .. "$", method = "GET", status = 404, code = "not_found",
                 message = "Batch not found.", times = 3 })
    local done = assert(c:wait(b.id, { interval = 0.05, factor = 1, jitter = 0 }))
    assert.are.equal("completed", done.status)
  end)

  it("for a create from a file uploaded a moment ago: the 400 'cannot find file' is asked again", function()
    local g = assert(c:upload(H.requests(dir .. "/in2.jsonl", 2, { url = "/v1/chat/completions", model = "qwen-plus" })))
    fault(emu, { path = "/batches$", method = "POST", status = 400, code = "invalid_request_error",
                 message = "Cannot find file " .. g.id, times = 2 })
    local b = assert(c:create({ input_file_id = g.id, endpoint = "/v1/chat/completions" }))
    assert.is_string(b.id)
  end)

  it("not made by this client, or past the window: the 404 is the answer", function()
    local other = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    fault(emu, { path = "/batches/" .. literal(b.id) .. "$", method = "GET", status = 404, code = "not_found",
                 message = "Batch not found.", times = 1 })
    local v, err = other:retrieve(b.id)
    assert.is_nil(v)
    assert.are.equal(404, err.status)
    local none = assert(lbatch.new({ api_key = "k", base_url = emu.base, fresh_window = 0 }))
    local b2 = assert(none:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    fault(emu, { path = "/batches/" .. literal(b2.id) .. "$", method = "GET", status = 404, code = "not_found",
                 message = "Batch not found.", times = 1 })
    v, err = none:retrieve(b2.id)
    assert.is_nil(v)
    assert.are.equal(404, err.status)
    other:close() none:close()
  end)
end)

-- A server that keeps the raw bytes of the one request it is sent and
-- answers it with a file object (luasocket, in its own process).
local CAPTURE = [[
local socket = require "socket"
local port, out = tonumber(arg[1]), arg[2]
local srv = assert(socket.bind("127.0.0.1", port))
io.stdout:write("ready\n") io.stdout:flush()
local conn = assert(srv:accept())
conn:settimeout(10)
local head = {}
while true do
  local line = assert(conn:receive("*l"))
  head[#head + 1] = line
  if line == "" then break end
end
local text = table.concat(head, "\r\n")
local n = tonumber(text:lower():match("content%-length:%s*(%d+)")) or 0
local body = n > 0 and assert(conn:receive(n)) or ""
local f = assert(io.open(out, "wb")) f:write(text, "\r\n", body) f:close()
local answer = '{"id":"file-capture","object":"file","bytes":1,"filename":"r.jsonl","purpose":"batch","created_at":1}'
conn:send("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: " .. #answer ..
          "\r\nConnection: close\r\n\r\n" .. answer)
conn:close()
]]

-- A file server that cuts its first answer halfway and answers the
-- second, whatever its Range, with the whole file (200): what a proxy or
-- a server without ranges does. It notes each request's Range header.
local WHOLE = [[
local socket = require "socket"
local port, out = tonumber(arg[1]), arg[2]
local srv = assert(socket.bind("127.0.0.1", port))
io.stdout:write("ready\n") io.stdout:flush()
local data = ("0123456789abcdef"):rep(4096)
local notes = assert(io.open(out, "wb"))
for i = 1, 2 do
  local conn = assert(srv:accept())
  conn:settimeout(10)
  local range = "none"
  while true do
    local line = assert(conn:receive("*l"))
    if line == "" then break end
    range = line:lower():match("^range:%s*(.*)") or range
  end
  notes:write(range, "\n") notes:flush()
  local head = "HTTP/1.1 200 OK\r\nContent-Length: " .. #data .. "\r\nConnection: close\r\n\r\n"
  conn:send(head .. (i == 1 and data:sub(1, #data // 2) or data))
  conn:close()
end
notes:close()
]]

-- start a script server on a free port (it says "ready" once it listens)
local function start(script, dir, out)
  for i = 1, 20 do
    local port = H.free_port()
    local said = ("%s/said-%d"):format(dir, i)
    H.ok(("%s %s %d %s > %s 2>&1 &"):format(H.lua, H.q(script), port, H.q(out), H.q(said)))
    for _ = 1, 100 do
      local text = H.read(said) or ""
      if text:find("ready", 1, true) then return port end
      if text ~= "" then break end               -- it failed (the port is taken): another
      H.sleep(0.02)
    end
  end
  error("the server did not start in " .. dir)
end

describe("a cut download from a server without ranges", function()
  it("starts over from byte 0 when the range is answered with the whole file", function()
    local dir = H.tmpdir()
    local notes = dir .. "/notes"
    local port = start(H.write(dir .. "/whole.lua", (WHOLE:gsub("#data // 2", "math.floor(#data / 2)"))), dir, notes)
    local c = assert(lbatch.new({ api_key = "k", base_url = ("http://127.0.0.1:%d/v1"):format(port) }))
    local out = dir .. "/out.jsonl"
    local v, err = c:content("file-1", { path = out })
    assert.are.equal(out, v, tostring(err))
    assert.are.equal(("0123456789abcdef"):rep(4096), H.read(out))
    local seen = {}
    for line in io.lines(notes) do seen[#seen + 1] = line end
    assert.are.equal("none", seen[1])
    assert.are.equal("bytes=32768-", seen[2])
    assert.are.equal("0", partials(dir))
    c:close()
  end)
end)

describe("an upload's file part", function()
  it("carries Content-Type application/octet-stream, as curl and the SDKs send it", function()
    local dir = H.tmpdir()
    local script = H.write(dir .. "/capture.lua", CAPTURE)
    local raw = dir .. "/raw"
    local port = start(script, dir, raw)
    local c = assert(lbatch.new({ api_key = "k", base_url = ("http://127.0.0.1:%d/v1"):format(port), max_retries = 0 }))
    local path = H.write(dir .. "/r.jsonl", '{"custom_id":"1"}\n')
    local f, err = c:upload(path)
    assert.is_truthy(f, tostring(err))
    local req = H.read(raw)
    local part = req:match('Content%-Disposition: form%-data; name="file"; filename="r.jsonl"\r\n(.-)\r\n\r\n')
    assert.is_truthy(part, req)
    assert.are.equal("Content-Type: application/octet-stream", part)
    c:close()
  end)
end)
