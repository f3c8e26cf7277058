-- lbatch side of bench/compare: N batches of M requests, each uploaded,
-- created, waited for (polling every POLL s) and downloaded, all at once
-- from one process. Also `upload FILE` and `download FILE_ID PATH`.
--   [BUDGET=N] [PROGRESS=1] lua5.4 bench/jobs.lua jobs N M POLL | upload FILE | download ID PATH
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"

-- BUDGET: status calls a minute for every wait together (default: the
-- service's, 100); the SDK's loop has none (each batch polled every POLL s)
local client = lbatch.new({ max_connections = 32, timeout = 600, poll_budget = tonumber(os.getenv("BUDGET") or "") })
local mode = arg[1]

-- PROGRESS=1: uploads and downloads report on_progress (counted, printed)
local reports = 0
local progress = os.getenv("PROGRESS") == "1" and { on_progress = function() reports = reports + 1 end } or nil

if mode == "upload" then
  local f = assert(client:upload(arg[2], nil, progress))
  if progress then    -- the figures last: bench/compare shows a row's last line
    print(f.id)
    print(("uploaded %d bytes, %d progress reports"):format(f.bytes, reports))
  else
    print(("uploaded %d bytes"):format(f.bytes))
    print(f.id)
  end
elseif mode == "download" then
  assert(client:content(arg[2], { path = arg[3], on_progress = progress and progress.on_progress }))
  if progress then io.write(("%d progress reports, "):format(reports)) end
  local fh = io.open(arg[3], "rb")
  print(("downloaded %d bytes"):format(fh:seek("end")))
  fh:close()
else
  local n, m, poll = tonumber(arg[2]) or 1000, tonumber(arg[3]) or 100, tonumber(arg[4]) or 1
  local path = os.tmpname()
  local w = jsonl.writer({ path = path, model = "qwen-plus" })
  for i = 1, m do assert(w:chat("r" .. i, { prompt = "question " .. i })) end
  w:close()
  local lines = 0
  for i = 1, n do
    client:spawn(function()
      local f = assert(client:upload(path, { filename = "bench-" .. i .. ".jsonl" }))
      local b = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
      b = assert(client:wait(b.id, { interval = poll, factor = 1, jitter = 0.2 }))
      local text = assert(client:content(b.output_file_id))
      for _ in text:gmatch("\n") do lines = lines + 1 end
    end)
  end
  assert(client:run())
  os.remove(path)
  print(("%d batches, %d result lines"):format(n, lines))
end
client:close()
