-- Journal appends per second, with and without fsync: what the pipeline's
-- synced "in flight" records (before an upload or a create goes out) cost.
--
--   lua5.4 bench/journal.lua [N] [DIR]     (DIR: default $TMPDIR or /tmp;
--                                            give one on the disk you run on)
-- Each record is a pipeline shard's, about 300 bytes. Prints appends/s for
-- append alone (write + flush: the page cache), append + sync (fsync: the
-- disk), and the pipeline's mix: a shard's life is about 8 records, of
-- which 2 (uploading, creating) are synced.
local journal = require "lbatch.impl.orchestration.journal"
local core = require "lbatch.core"

local N = tonumber(arg and arg[1]) or 2000
local dir = arg and arg[2] or os.getenv("TMPDIR") or "/tmp"
local now = core.now

local shard = { k = 1, shard = { k = 1, path = dir .. "/shard-1.jsonl", name = "0123456789ab-1.jsonl", lines = 50000,
  model = "qwen-plus", endpoint = "/v1/chat/completions", round = 1, step = "uploading",
  file_id = "file-batch-0123456789abcdef", batch_id = "batch_0123456789abcdef", status = "in_progress" } }

-- appends/s over n records; sync(i): is record i synced
local function rate(n, sync)
  local path = ("%s/lbatch-bench-journal-%d.jsonl"):format(dir, math.random(1e9))
  local j = assert(journal.open(path, nil, { durable = true }))
  local t0 = now()
  for i = 1, n do
    assert(j:append(shard))
    if sync(i) then assert(j:sync()) end
  end
  local t = now() - t0
  j:close()
  os.remove(path)
  return n / t, t / n * 1e3
end

local rows = {
  { "append (write + flush)", N * 10, function() return false end },
  { "append + fsync, every record", N, function() return true end },
  { "the pipeline's mix (2 of 8 synced)", N * 4, function(i) return i % 8 == 1 or i % 8 == 5 end },
}
print(("journal appends in %s, %s"):format(dir, rawget(_G, "jit") and "LuaJIT" or _VERSION))
for _, r in ipairs(rows) do
  local per_s, ms = rate(r[2], r[3])
  print(("  %-36s %10.0f appends/s  %8.4f ms each"):format(r[1], per_s, ms))
end
