-- A flow: each question answered, the answer scored by a judge model, the
-- low scorers revised; written for one item as plain sequential Lua, run
-- for every item at batch prices (lbatch.flow). Killed and run again with
-- the same dir, it goes on where it stopped and asks nothing twice.
--
--   emulator/around lua5.4 examples/judge.lua [questions.csv] [dir]
--   DASHSCOPE_API_KEY=sk-... lua5.4 examples/judge.lua questions.csv work/judge
--   lbatch flow examples/judge.lua --items questions.csv --dir work/judge   # the same flow, by the command
--
-- As a program it runs the flow; loaded by `lbatch flow` (or dofile) it
-- returns the flow, {key, step}, and runs nothing.
--
-- On the emulator every answer echoes its prompt, so no judge replies with
-- a number: a reply that is not one scores 0, and every answer is revised.
local judge = {
  key = function(item) return item.id end,
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
}

-- loaded, not run: this file is not the program's script
if not (arg and debug.getinfo(1, "S").source == "@" .. tostring(arg[0])) then return judge end

local lbatch = require "lbatch"
local flow = require "lbatch.flow"

local items = arg[1] or "examples/questions.csv"
local dir = arg[2] or (os.tmpname() .. "-judge")   -- a name of its own: two runs at once do not clash

local client = lbatch.new()   -- key: DASHSCOPE_API_KEY; URL: LBATCH_BASE_URL or the cn region
local report = assert(flow.run{
  client = client, dir = dir, items = items, key = judge.key, step = judge.step,
  poll_interval = 1, max_poll_interval = 300,
})
for r in report.results:each() do
  if r.ok then print(("%-4s %2d  %s"):format(r.key, r.value.score, (r.value.answer:gsub("%s+", " "):sub(1, 70))))
  else print(("%-4s failed: %s"):format(r.key, r.error)) end
end
print(("%d items: %d done, %d failed; %d asks in %d rounds, %d batches, %d tokens -> %s"):format(report.items,
  report.done, report.failed, report.asks, #report.rounds, report.batches, report.tokens, dir))
client:close()
