-- Lines per second: the lbatch.jsonl writer and the lbatch.results reader
-- next to plain lua-cjson on the same lines, in the same run.
--
--   make bench                (Lua 5.4 and LuaJIT)
-- The writer runs with every check on (its default); each side is timed
-- best of five rounds, the two taken in turns.
--   lua5.4 bench/jsonl.lua [N]
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local cjson = require "cjson"

local N = tonumber(arg and arg[1]) or 200000
local dir = os.getenv("TMPDIR") or "/tmp"
local clock = os.clock

-- best of `runs` for each of two functions, run in turns so both see the
-- same machine (a busy neighbour, a warm cache)
local function duel(runs, a, b)
  local ta, tb = math.huge, math.huge
  for _ = 1, runs do
    collectgarbage()
    local t0 = clock()
    a()
    ta = math.min(ta, clock() - t0)
    collectgarbage()
    t0 = clock()
    b()
    tb = math.min(tb, clock() - t0)
  end
  return ta, tb
end

local function body(i)
  local question = "Question number " .. i .. ": what is " .. i .. " + " .. i .. "?"
  return { model = "qwen-plus", temperature = 0.7, max_tokens = 512,
           messages = { { role = "system", content = "You are a helpful assistant." },
                        { role = "user", content = question } } }
end

-- writing: plain cjson.encode of the whole request line vs the writer
local plain_path, lb_path = dir .. "/lbatch-bench-plain.jsonl", dir .. "/lbatch-bench-writer.jsonl"
local t_plain_w, t_lb_w = duel(5, function()
  local f = assert(io.open(plain_path, "wb"))
  f:setvbuf("full", 1024 * 1024)
  for i = 1, N do
    f:write(cjson.encode({ custom_id = "r" .. i, method = "POST", url = "/v1/chat/completions", body = body(i) }), "\n")
  end
  f:close()
end, function()
  local w = jsonl.writer({ path = lb_path, max_lines = 50000 })
  for i = 1, N do assert(w:add("r" .. i, body(i))) end
  w:close()
end)

-- results in the service's output format
local out_path = dir .. "/lbatch-bench-output.jsonl"
do
  local f = assert(io.open(out_path, "wb"))
  for i = 1, N do
    f:write(cjson.encode({
      id = "batch_req_" .. i, custom_id = "r" .. i, error = cjson.null,
      response = { status_code = 200, request_id = "req-" .. i, body = {
        id = "chatcmpl-" .. i, object = "chat.completion", created = 1711475054, model = "qwen-plus",
        choices = { { index = 0, finish_reason = "stop", message = { role = "assistant",
                      content = "The answer to question " .. i .. " is " .. 2 * i .. "." } } },
        usage = { prompt_tokens = 24, completion_tokens = 15, total_tokens = 39 } } },
    }), "\n")
  end
  f:close()
end

-- both read what a user reads of each record: its custom_id, whether it
-- is ok, the answer and the tokens
local t_plain_r, t_lb_r = duel(5, function()
  local n, chars, tokens = 0, 0, 0
  for line in io.lines(out_path) do
    local r = cjson.decode(line)
    local resp = r.response
    if r.error == cjson.null and resp.status_code == 200 and type(r.custom_id) == "string" then
      local b = resp.body
      n = n + 1
      chars = chars + #b.choices[1].message.content
      tokens = tokens + b.usage.total_tokens
    end
  end
  assert(n == N and tokens == 39 * N and chars > 0)
end, function()
  local n, chars, tokens = 0, 0, 0
  for rec in results.open({ output = out_path }):each() do
    if rec.ok and type(rec.custom_id) == "string" then
      n = n + 1
      chars = chars + #rec.content
      tokens = tokens + rec.usage.total_tokens
    end
  end
  assert(n == N and tokens == 39 * N and chars > 0)
end)

os.remove(plain_path); os.remove(out_path)
for i = 1, math.ceil(N / 50000) do os.remove(i == 1 and lb_path or lb_path:gsub("%.jsonl$", "-" .. i .. ".jsonl")) end

local runtime = jit and jit.version or _VERSION
local function row(what, t, base)
  print(("%-11s %-28s %10.0f lines/s   %5.1f%% of plain lua-cjson"):format(runtime, what, N / t, 100 * base / t))
end
print(("%-11s %-28s %10.0f lines/s"):format(runtime, "cjson.encode + write", N / t_plain_w))
row("jsonl writer", t_lb_w, t_plain_w)
print(("%-11s %-28s %10.0f lines/s"):format(runtime, "io.lines + cjson.decode", N / t_plain_r))
row("results reader", t_lb_r, t_plain_r)
