-- A flow: each question answered, the answer scored by a judge model, the
-- low scorers revised; written for one item as plain sequential Lua, run
-- for every item at batch prices (lbatch.flow). Killed and run again with
-- the same dir, it goes on where it stopped and asks nothing twice.
--
--   emulator/around lua5.4 examples/judge.lua [questions.csv] [dir]
--   DASHSCOPE_API_KEY=sk-... lua5.4 examples/judge.lua questions.csv work/judge
--
-- On the emulator every answer echoes its prompt, so no judge replies with
-- a number: a reply that is not one scores 0, and every answer is revised.
local lbatch = require "lbatch"
local flow = require "lbatch.flow"

local items = arg[1] or "examples/questions.csv"
local dir = arg[2] or ((os.getenv("TMPDIR") or "/tmp") .. "/lbatch-judge-" .. os.time())

local client = lbatch.new()   -- key: DASHSCOPE_API_KEY; URL: LBATCH_BASE_URL or the cn region
local report = assert(flow.run{
  client = client, dir = dir, items = items,
  key = function(item) return item.id end,
  poll_interval = 1, max_poll_interval = 300,
  step = function(item, ask)
    local a = assert(ask{ model = "qwen-plus", prompt = item.question })
    local j = assert(ask{ model = "qwen-max", system = "Score 1-10. Reply with the number only.",
                          prompt = item.question .. "\n\n" .. a.content })
    local score = tonumber(j.content:match("^%s*(%d+)%s*$")) or 0
    if score < 6 then
      a = assert(ask{ model = "qwen-plus", prompt = "Improve this answer:\n" .. a.content })
    end
    return { answer = a.content, score = score }
  end,
})
for r in report.results:each() do
  if r.ok then print(("%-4s %2d  %s"):format(r.key, r.value.score, (r.value.answer:gsub("%s+", " "):sub(1, 70))))
  else print(("%-4s failed: %s"):format(r.key, r.error)) end
end
print(("%d items: %d done, %d failed; %d asks in %d rounds, %d batches, %d tokens -> %s"):format(report.items,
  report.done, report.failed, report.asks, #report.rounds, report.batches, report.tokens, dir))
client:close()
