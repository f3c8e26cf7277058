-- An evaluation workflow: a CSV of questions in, a CSV of questions beside
-- answers out. The requests are sharded, submitted and waited for at once
-- (one task per shard), and the results joined back to the questions.
--
--   emulator/around lua5.4 examples/evaluate.lua [questions.csv] [answers.csv] [model]
local lbatch = require "lbatch"
local csv = require "lbatch.csv"
local results = require "lbatch.results"

local input = arg[1] or "examples/questions.csv"
local base = not arg[2] and os.tmpname()   -- a name of its own: two runs at once do not clash
local output = arg[2] or (base .. "-answers.csv")
local model = arg[3] or os.getenv("LBATCH_MODEL") or "qwen-plus"
local work = output:gsub("%.csv$", "") .. "-requests.jsonl"

-- 1. questions -> request files (sharded if large)
local manifest = assert(csv.to_jsonl(input, { path = work, model = model, system = "Answer in one sentence." }))
print(("%d questions in %d file(s) for %s"):format(manifest.lines, #manifest.files, model))

-- 2. every shard at once: upload, create, wait with backoff, download
local client = lbatch.new()
local outputs, errors = {}, {}
for i, file in ipairs(manifest.files) do
  client:spawn(function()
    local f = assert(client:upload(file.path))
    local b = assert(client:create({ input_file_id = f.id, endpoint = file.endpoint }))
    local delay = 1
    repeat
      client:sleep(delay)
      delay = math.min(delay * 2, 60)
      b = assert(client:retrieve(b.id))
    until b.completed_at or b.failed_at or b.expired_at or b.cancelled_at
    print(("shard %d: %s, %d done, %d failed"):format(i, b.status, b.request_counts.completed, b.request_counts.failed))
    if b.output_file_id then
      outputs[#outputs + 1] = assert(client:content(b.output_file_id, { path = file.path .. ".out" }))
    end
    if b.error_file_id then
      errors[#errors + 1] = assert(client:content(b.error_file_id, { path = file.path .. ".err" }))
    end
  end)
end
assert(client:run())
client:close()

-- 3. answers beside questions, in question order, with a byte-order mark
-- so spreadsheet programs read the Chinese right
local inputs = {}
for i, f in ipairs(manifest.files) do inputs[i] = f.path end
local reader = results.open({ output = outputs, errors = errors, inputs = inputs })
assert(csv.from_results(reader, output, { bom = true,
  columns = { "custom_id", "input", "content", "status_code", "error_code", "error_message" },
  header = { "id", "question", "answer", "status", "error_code", "error" } }))
local s = reader:summary()
print(("%d answered, %d failed, %d missing, %d tokens -> %s"):format(s.ok, s.failed, s.missing, s.total_tokens, output))
if base then os.remove(base) end
