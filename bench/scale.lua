-- The Lua side of bench/scale (see there). Modes:
--   gen N DIR        shards of 50,000 requests (ids req-0000001... in order,
--                    LuaJIT's hardest case), their answers shuffled within the
--                    shard, 0.1% errors, 0.05% missing; and, up to 1,000,000,
--                    the same as one file each (all.*.jsonl)
--   merge DIR        lbatch's join, shard by shard (as the pipeline merges)
--   single DIR       lbatch's join of the single files (bounded by max_index)
--                    (merge and single: FIELDS=a,b reads records made with
--                    each{fields = {a, b}})
--   naive DIR        every answer decoded into one Lua table, then the inputs
--   pipeline N DIR   N requests through lbatch.pipeline on the emulator
--   batchchat N DIR | filebatch N DIR  the same N requests through Batch
--                    Chat (pipeline.run{via = "batch_chat"}) or as a file batch:
--                    requests a second, connections opened
--   jobs N           N batches in flight at once, watched by one client
--   flow N DIR       a three-step flow (answer, judge, revise the low
--                    scorers: spec/fixtures/judge_flow.lua) over N items
--                    on the emulator, read from a JSON-lines file; prints
--                    the flow process's own peak RSS (VmHWM)
--   quota N K        N shards of one model under an enqueued-token limit
--                    that holds K of them (the emulator's token_limit mode)
--   told N | polled N  N jobs ending over about 30 s, each end seen through
--                    the emulator's webhooks (a lua-http listener on
--                    NOTIFY_PORT, lbatch.lua_http.serve) or by polling alone:
--                    the delay from the emulator's finish to lbatch seeing
--                    it (max, median) and status calls a job
-- Each prints one line of figures; bench/scale adds wall, CPU and RSS.
local cjson = require "cjson"
local core = require "lbatch.core"
local now = core.now

local mode, a, b = arg[1], arg[2], arg[3]
local SHARD = 50000

local function request(i)
  return ('{"custom_id":"req-%07d","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
    .. '"messages":[{"role":"user","content":"Question number %d: what is %d + %d?"}]}}'):format(i, i, i, i)
end

-- the emulator's stats with each batch's finish time (and its clock: stats.now)
local function finished_stats()
  local base = os.getenv("LBATCH_BASE_URL"):gsub("/compatible%-mode/v1$", "")
  local p = io.popen("curl -s '" .. base .. "/_emulator/stats?finished=1'")
  local stats = cjson.decode(p:read("*a"))
  p:close()
  return stats
end

-- a file of 10 requests, uploaded: the input of the jobs and told/polled runs
local function ten_requests(client)
  local path = os.tmpname()
  local fh = io.open(path, "wb")
  for i = 1, 10 do fh:write(request(i), "\n") end
  fh:close()
  local f = assert(client:upload(path))
  os.remove(path)
  return f
end

local function answer(i)
  return ('{"id":"batch_req_%d","custom_id":"req-%07d","response":{"status_code":200,"request_id":"r-%d","body":'
    .. '{"id":"chatcmpl-%d","object":"chat.completion","created":1795000000,"model":"qwen-plus",'
    .. '"choices":[{"index":0,"message":{"role":"assistant","content":"The answer to question %d is %d."},'
    .. '"finish_reason":"stop"}],'
    .. '"usage":{"prompt_tokens":20,"completion_tokens":9,"total_tokens":29}}},"error":null}')
    :format(i, i, i, i, i, 2 * i)
end

local function failure(i)
  return ('{"id":"batch_req_%d","custom_id":"req-%07d","response":{"status_code":400,"request_id":"r-%d","body":'
    .. '{"error":{"code":"invalid_parameter","message":"bad request %d"}}},"error":{"code":"invalid_parameter",'
    .. '"message":"bad request %d"}}'):format(i, i, i, i, i)
end

local function shards_of(dir)
  local groups, k = {}, 1
  while true do
    local base = ("%s/s%04d"):format(dir, k)
    local fh = io.open(base .. ".in.jsonl")
    if not fh then break end
    fh:close()
    groups[k] = { inputs = base .. ".in.jsonl", output = base .. ".out.jsonl", errors = base .. ".err.jsonl" }
    k = k + 1
  end
  return groups
end

local function count(reader, opts)
  local n, ok, failed, missing = 0, 0, 0, 0
  for rec, err in reader:each(opts) do
    if not rec then error(tostring(err)) end
    n = n + 1
    if rec.ok then ok = ok + 1 elseif rec.missing then missing = missing + 1 else failed = failed + 1 end
  end
  return n, ok, failed, missing
end

if mode == "gen" then
  local n, dir = tonumber(a), b
  local t0 = now()
  local single = n <= 1000000
  local all_in, all_out, all_err
  if single then
    all_in, all_out, all_err = io.open(dir .. "/all.in.jsonl", "wb"), io.open(dir .. "/all.out.jsonl", "wb"),
      io.open(dir .. "/all.err.jsonl", "wb")
  end
  math.randomseed(42)
  local k = 0
  for first = 1, n, SHARD do
    k = k + 1
    local last = math.min(n, first + SHARD - 1)
    local base = ("%s/s%04d"):format(dir, k)
    local fin, fout, ferr = io.open(base .. ".in.jsonl", "wb"), io.open(base .. ".out.jsonl", "wb"),
      io.open(base .. ".err.jsonl", "wb")
    local order = {}
    for i = first, last do
      local line = request(i)
      fin:write(line, "\n")
      if all_in then all_in:write(line, "\n") end
      if i % 2000 ~= 7 then order[#order + 1] = i end         -- 0.05% missing
    end
    for i = #order, 2, -1 do local j = math.random(i) order[i], order[j] = order[j], order[i] end
    for _, i in ipairs(order) do
      if i % 1000 == 3 then
        local line = failure(i)
        ferr:write(line, "\n")
        if all_err then all_err:write(line, "\n") end
      else
        local line = answer(i)
        fout:write(line, "\n")
        if all_out then all_out:write(line, "\n") end
      end
    end
    fin:close() fout:close() ferr:close()
  end
  if single then all_in:close() all_out:close() all_err:close() end
  print(("generated %d requests in %d shards in %.1f s"):format(n, k, now() - t0))

elseif mode == "merge" or mode == "single" then
  local results = require "lbatch.results"
  local dir = a
  local r
  if mode == "merge" then r = assert(results.open({ groups = shards_of(dir) }))
  else r = assert(results.open({ output = dir .. "/all.out.jsonl", errors = dir .. "/all.err.jsonl",
                                 inputs = dir .. "/all.in.jsonl" })) end
  local t0 = now()
  local fields = os.getenv("FIELDS")   -- FIELDS=status_code,content: each{fields = ...}
  local opts
  if fields and fields ~= "" then
    opts = { fields = {} }
    for name in fields:gmatch("[^,]+") do opts.fields[#opts.fields + 1] = name end
  end
  local n, ok, failed, missing = count(r, opts)
  local t = now() - t0
  print(("%d records (%d ok, %d failed, %d missing), %.0f records/s"):format(n, ok, failed, missing, n / t))

elseif mode == "naive" then
  local dir = a
  local t0 = now()
  local by_id = {}
  for _, p in ipairs({ dir .. "/all.out.jsonl", dir .. "/all.err.jsonl" }) do
    for line in io.lines(p) do
      local r = cjson.decode(line)
      by_id[r.custom_id] = r
    end
  end
  local n, ok, failed, missing = 0, 0, 0, 0
  for line in io.lines(dir .. "/all.in.jsonl") do
    local req = cjson.decode(line)
    local r = by_id[req.custom_id]
    n = n + 1
    if not r then missing = missing + 1
    elseif r.error == cjson.null and r.response.status_code == 200 then ok = ok + 1
    else failed = failed + 1 end
  end
  local t = now() - t0
  print(("%d records (%d ok, %d failed, %d missing), %.0f records/s"):format(n, ok, failed, missing, n / t))

elseif mode == "pipeline" then
  local lbatch = require "lbatch"
  local pipeline = require "lbatch.pipeline"
  local n, dir = tonumber(a), b
  local client = lbatch.new({ max_connections = 16, timeout = 600 })
  local path = dir .. "/requests.jsonl"
  local fh = assert(io.open(path, "wb"))
  for i = 1, n do fh:write(request(i), "\n") end
  fh:close()
  local marks = {}
  local function mark(k, last)
    if last or not marks[k] then marks[k] = now() end
  end
  local t0 = now()
  local report = assert(pipeline.run({ client = client, requests = path, dir = dir .. "/run",
    max_in_flight = 1000, poll_interval = tonumber(os.getenv("POLL") or "2"), poll_factor = 1,
    metadata = { emulator_line_seconds = os.getenv("LINE_SECONDS") or "0.002" },
    on_step = function(step)
      if step == "before_upload" then mark("upload") end
      if step == "after_upload" then mark("uploaded", true) end
      if step == "after_create" then mark("created", true) end
      if step == "waiting" then mark("waiting", true) end
      if step == "after_download" then mark("downloaded", true) end
    end }))
  local t_end = now()
  local total = count(report.results)
  local t_merge = now() - t_end
  local shards = #report.shards
  local base = os.getenv("LBATCH_BASE_URL"):gsub("/compatible%-mode/v1$", "")
  local p = io.popen("curl -s " .. base .. "/_emulator/stats")
  local stats = cjson.decode(p:read("*a"))
  p:close()
  local r, limited = stats.routes or {}, 0
  for route, k in pairs(r) do if route:find("^429") then limited = limited + k end end
  local status = (r["GET /batches"] or 0) + (r["GET /batches/{id}"] or 0)
  print(("%d records from %d shards: shard %.0f req/s, upload %.0f req/s, wait and download %.1f s, "
    .. "merge %.0f req/s; %.1f status calls a job, %d answers 429"):format(total, shards,
    n / (marks.upload - t0), n / (marks.uploaded - marks.upload), marks.downloaded - marks.created,
    n / t_merge, status / shards, limited))
  client:close()

elseif mode == "batchchat" or mode == "filebatch" then
  -- the same N requests through Batch Chat (CONCURRENCY held calls at once,
  -- HTTP/2 when the emulator serves TLS) or as a file batch (the pipeline);
  -- requests a second end to end and the connections the emulator saw
  local lbatch = require "lbatch"
  local pipeline = require "lbatch.pipeline"
  local n, dir = tonumber(a), b
  local client = lbatch.new({ timeout = 600 })
  local path = dir .. "/requests.jsonl"
  local fh = assert(io.open(path, "wb"))
  for i = 1, n do fh:write(request(i), "\n") end
  fh:close()
  local base = os.getenv("LBATCH_BASE_URL"):gsub("/compatible%-mode/v1$", "")
  local t0 = now()
  local report = assert(pipeline.run({ client = client, requests = path, dir = dir .. "/run",
    via = mode == "batchchat" and "batch_chat" or nil, batch_chat_url = mode == "batchchat"
      and (base .. "/_batchchat/compatible-mode/v1") or nil,
    concurrency = mode == "batchchat" and tonumber(os.getenv("CONCURRENCY") or "500") or nil,
    poll_interval = mode == "filebatch" and tonumber(os.getenv("POLL") or "0.5") or nil,
    poll_factor = mode == "filebatch" and 1 or nil }))
  local t = now() - t0
  local total = count(report.results)
  local p = io.popen("curl -s " .. base .. "/_emulator/stats")
  local stats = cjson.decode(p:read("*a"))
  p:close()
  local proto = type(stats.protocols) == "table" and stats.protocols or {}
  print(("%d records, %.0f requests/s end to end, %d connection(s) opened, %d calls (%d on HTTP/2)"):format(total,
    n / t, stats.connections, (proto["HTTP/2.0"] or 0) + (proto["HTTP/1.1"] or 0), proto["HTTP/2.0"] or 0))
  client:close()

elseif mode == "flow" then
  local lbatch = require "lbatch"
  local flow = require "lbatch.flow"
  local judge = dofile("spec/fixtures/judge_flow.lua")
  local n, dir = tonumber(a), b
  local path = dir .. "/items.jsonl"
  local fh = assert(io.open(path, "wb"))
  for i = 1, n do fh:write(('{"id":"q%07d","question":"Question %d: what is %d + %d?"}\n'):format(i, i, i, i)) end
  fh:close()
  local client = lbatch.new({ max_connections = 16, timeout = 600 })
  local t0 = now()
  local report = assert(flow.run({ client = client, dir = dir .. "/flow", items = path, key = judge.key,
    step = judge.step, max_lines = tonumber(os.getenv("FLOW_MAX_LINES") or "10000"),
    max_in_flight = tonumber(os.getenv("FLOW_IN_FLIGHT") or "8"),
    poll_interval = 0.2, poll_factor = 1,
    metadata = { emulator_line_seconds = os.getenv("LINE_SECONDS") or "0.002" } }))
  local wall = now() - t0
  local status = io.open("/proc/self/status"):read("*a")
  local hwm = tonumber(status:match("VmHWM:%s*(%d+)")) or 0
  print(("%d items done in %d rounds, %d asks, %d batches, %.0f asks/s; flow process peak RSS %.1f MB"):format(
    report.done, #report.rounds - 1, report.asks, report.batches, report.asks / wall, hwm / 1024))
  client:close()

elseif mode == "jobs" then
  local lbatch = require "lbatch"
  local n = tonumber(a)
  local client = lbatch.new({ max_connections = 16 })
  local f = ten_requests(client)
  local w = client:watcher()
  local times, take = {}, w.take
  w.take = function(self)
    local ok = take(self)
    if ok then times[#times + 1] = now() end
    return ok
  end
  local interval = tonumber(os.getenv("POLL") or "10")
  local seen_at, ids = {}, {}
  local t0 = now()
  for i = 1, n do
    client:spawn(function()
      local bt = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
        metadata = { emulator_line_seconds = os.getenv("LINE_SECONDS") or "300" } }))
      ids[i] = bt.id
      bt = assert(client:wait(bt.id, { interval = interval, factor = 1, jitter = 0 }))
      seen_at[bt.id] = now()
    end)
  end
  assert(client:run())
  local elapsed = now() - t0
  local stats = finished_stats()
  local t_here = now()
  local worst = 0
  for _, id in ipairs(ids) do
    local seen = stats.now - (t_here - seen_at[id])
    worst = math.max(worst, seen - stats.finished[id])
  end
  local peak, j = 0, 1
  for i = 1, #times do
    while times[i] - times[j] >= 60 do j = j + 1 end
    peak = math.max(peak, i - j + 1)
  end
  local r, limited = stats.routes or {}, 0
  for route, k in pairs(r) do if route:find("^429") then limited = limited + k end end
  print(("%d jobs in flight for %.0f s: %d status calls (%d list pages, %d retrieves), at most %d in any minute; "
    .. "%d answers 429; each end seen at most %.1f s after it (poll interval %g s)"):format(n, elapsed, #times,
    r["GET /batches"] or 0, r["GET /batches/{id}"] or 0, peak, limited, worst, interval))
  client:close()
elseif mode == "quota" then
  local lbatch = require "lbatch"
  local pipeline = require "lbatch.pipeline"
  local shards, fit = tonumber(a), tonumber(b)
  local lines, tokens = 100, 10                 -- a line's prompt: 10 tokens on the emulator's count
  local base = os.getenv("LBATCH_BASE_URL"):gsub("/compatible%-mode/v1$", "")
  local limit = math.floor((fit + 0.5) * lines * tokens)
  assert(os.execute(("curl -sf -o /dev/null -X POST -H 'Content-Type: application/json' "
    .. "-d '{\"token_limit\": {\"tokens\": %d}}' %s/_emulator/modes"):format(limit, base)))
  -- emulator/around sets DASHSCOPE_API_KEY: an OpenAI client is given it
  local client = lbatch.new({ region = "openai", api_key = os.getenv("DASHSCOPE_API_KEY"), max_connections = 16 })
  local dir = os.tmpname()
  os.remove(dir)
  local reqs = {}
  for i = 1, shards * lines do
    local text = ("q%07d "):format(i)
    reqs[i] = { custom_id = "q" .. i, body = { model = "gpt-4o-mini", max_tokens = 10,
      messages = { { role = "user", content = text .. ("x"):rep(tokens * 4 - #text) } } } }
  end
  local created, ended, delays = {}, {}, 0
  local t0 = now()
  local report = assert(pipeline.run({ client = client, requests = reqs, dir = dir, max_lines = lines,
    max_in_flight = shards, poll_interval = tonumber(os.getenv("POLL") or "1"), poll_factor = 1,
    quota_backoff = 0.5,
    on_step = function(step, sh)
      if step == "after_create" then created[sh.k] = now() end
      if step == "quota_delay" then delays = delays + 1 end
      if step == "after_download" then ended[sh.k] = now() end
    end }))
  local wall = now() - t0
  local total = count(report.results)
  -- a batch's own time: the shortest from create to download, of the
  -- shards that ran first time; the ideal is the waves the quota allows
  local one = math.huge
  for k, t in pairs(ended) do if created[k] then one = math.min(one, t - created[k]) end end
  local ideal = math.ceil(shards / fit) * one
  local p = io.popen("curl -s " .. base .. "/_emulator/stats")
  local stats = cjson.decode(p:read("*a"))
  p:close()
  local r, limited = stats.routes or {}, 0
  for route, k in pairs(r) do if route:find("^429") then limited = limited + k end end
  print(("%d records from %d shards, %d at a time: %.1f s against an ideal %.1f s (%.2fx); %.2f creates a shard, "
    .. "%d quota delays, %d uploads (%d re-uploads), %d answers 429"):format(total, shards, fit, wall, ideal,
    wall / ideal, (r["POST /batches"] or 0) / shards, delays, r["POST /files"] or 0,
    (r["POST /files"] or 0) - shards, limited))
  os.execute("rm -rf " .. dir)
  client:close()
elseif mode == "told" or mode == "polled" then
  local lbatch = require "lbatch"
  local n, interval = tonumber(a), tonumber(os.getenv("POLL") or "10")
  -- emulator/around sets DASHSCOPE_API_KEY: an OpenAI client is given it
  local client = lbatch.new({ region = "openai", api_key = os.getenv("DASHSCOPE_API_KEY"), max_connections = 16 })
  local f = ten_requests(client)
  local seen_at, ids = {}, {}
  local function jobs()
    local tasks = {}
    for i = 1, n do
      tasks[i] = client:spawn(function()
        -- 10 lines of 30 to 300 service seconds each: ends spread over about 30 s at --speed 100
        local bt = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
          metadata = { emulator_line_seconds = tostring(30 + (i * 37) % 271) } }))
        ids[i] = bt.id
        bt = assert(client:wait(bt.id, { interval = interval, factor = 1, jitter = 0 }))
        seen_at[bt.id] = now()
      end)
    end
    for _, t in ipairs(tasks) do
      local _, err = t:join()
      if err then error(err) end
    end
    return true
  end
  local t0 = now()
  if mode == "told" then
    client:expect_notices()
    assert(require("lbatch.lua_http").serve({ client = client, listen = "127.0.0.1:" .. os.getenv("NOTIFY_PORT"),
      secrets = { os.getenv("NOTIFY_SECRET") } }, jobs))
  else
    client:spawn(jobs)
    assert(client:run())
  end
  local elapsed = now() - t0
  local stats = finished_stats()
  local t_here = now()
  local delays = {}
  -- (the two clocks agree to about a millisecond: a delay below 0 is 0)
  for i, id in ipairs(ids) do delays[i] = math.max(0, stats.now - (t_here - seen_at[id]) - stats.finished[id]) end
  table.sort(delays)
  local median = #delays % 2 == 1 and delays[(#delays + 1) / 2] or (delays[#delays / 2] + delays[#delays / 2 + 1]) / 2
  local r = stats.routes or {}
  local calls = (r["GET /batches"] or 0) + (r["GET /batches/{id}"] or 0)
  print(("%d jobs %s, over %.0f s: each end seen %.3f s after the emulator's at most, %.3f s median; "
    .. "%.2f status calls a job (%d list pages, %d retrieves; poll interval %g s)"):format(n,
    mode == "told" and "told by webhooks" or "polled", elapsed, delays[#delays], median, calls / n,
    r["GET /batches"] or 0, r["GET /batches/{id}"] or 0, interval))
  client:close()
else
  io.stderr:write("usage: bench/scale.lua gen N DIR | merge DIR | single DIR | naive DIR | pipeline N DIR"
    .. " | flow N DIR | jobs N | quota N K | told N | polled N\n")
  os.exit(2)
end
