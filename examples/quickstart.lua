-- The main job end to end: write a request file, upload it, create a batch,
-- wait for it, download the output and error files, print what came back.
--
--   emulator/around lua5.4 examples/quickstart.lua   -- offline, on the local emulator
--   make demo                                        -- the same, then evaluate.lua
--   DASHSCOPE_API_KEY=sk-... make demo               -- the real service, batch-test-model
local lbatch = require "lbatch"
local cjson = require "cjson"

local client = lbatch.new()   -- key: DASHSCOPE_API_KEY; URL: LBATCH_BASE_URL or the cn region
-- the files of this run, beside a name of its own (two runs at once do not clash)
local base = os.tmpname()
local input = base .. "-requests.jsonl"

-- 1. ten requests for the test model (free, answers "This is a test result.")
local f = assert(io.open(input, "wb"))
for i = 1, 10 do
  -- on the emulator, the marker makes request 7 fail so the error file shows
  local text = i == 7 and "lbatch-emulator:fail (a failure on purpose)" or ("What is " .. i .. " + " .. i .. "?")
  f:write(cjson.encode({
    custom_id = "q" .. i, method = "POST", url = "/v1/chat/ds-test",
    body = { model = "batch-test-model", messages = { { role = "user", content = text } } },
  }), "\n")
end
f:close()
print("service  " .. client.base_url)

-- 2. upload and create
local file = assert(client:upload(input))
print(("uploaded %s (%d bytes)"):format(file.id, file.bytes))
local batch = assert(client:create({
  input_file_id = file.id, endpoint = "/v1/chat/ds-test", completion_window = "24h",
  metadata = { ds_name = "lbatch quickstart" },
}))
print("created  " .. batch.id)

-- 3. wait: poll with backoff (1 s doubling to 60 s), print each change
local final = { completed = true, failed = true, expired = true, cancelled = true }
local delay, last = 1, nil
while not final[batch.status] do
  client:sleep(delay)
  delay = math.min(delay * 2, 60)
  batch = assert(client:retrieve(batch.id))
  local c = batch.request_counts or {}
  local now = ("%s %d/%d done, %d failed"):format(batch.status, c.completed or 0, c.total or 0, c.failed or 0)
  if now ~= last then print("status   " .. now) last = now end
end

if batch.status == "failed" then
  for _, e in ipairs(batch.errors and batch.errors.data or {}) do
    print(("invalid  line %s: %s %s"):format(tostring(e.line), e.code, e.message))
  end
  os.exit(1)
end

-- 4. download the output and error files (streamed to disk)
local function show(id, label)
  if not id then return end
  local path = assert(client:content(id, { path = base .. "-" .. label .. ".jsonl" }))
  print(label .. "   " .. path)
  for line in io.lines(path) do
    local r = cjson.decode(line)
    local body = r.response ~= cjson.null and r.response.body
    local answer = body and body.choices and body.choices[1].message.content
    local err = r.error ~= cjson.null and r.error or (body and body.error)
    print(("  %-4s %s"):format(r.custom_id, answer or (err and (err.code .. ": " .. err.message)) or "?"))
  end
end
show(batch.output_file_id, "output")
show(batch.error_file_id, "errors")
os.remove(base)
client:close()
