-- A host with its own loop (a game, a GUI): one client:step() per frame,
-- never blocking, while a whole pipeline runs in a task.
--
--   emulator/around lua5.4 examples/game_loop.lua
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local core = require "lbatch.core"

local client = lbatch.new()
local base = os.tmpname()                -- a name of its own: two runs at once do not clash
local dir = base .. "-game-loop"

local requests = {}
for i = 1, 60 do
  requests[i] = { custom_id = "npc-" .. i, body = { model = "qwen-plus",
    messages = { { role = "user", content = "A line of dialogue for villager " .. i } } } }
end

local report
local job = client:spawn(function()
  report = assert(pipeline.run({ client = client, requests = requests, dir = dir, max_lines = 10,
                                 poll_interval = 0.5, max_poll_interval = 2 }))
end)

local frame, worst, FRAME = 0, 0, 1 / 60
while not job:done() do
  local t0 = core.now()
  local _, failure = client:step()          -- returns at once
  local spent = core.now() - t0
  if failure then error(failure) end
  worst = math.max(worst, spent)
  frame = frame + 1
  -- ... update and draw the game here ...
  core.sleep(FRAME - spent)
end
local ok = 0
for rec in report.results:each() do if rec.ok then ok = ok + 1 end end
print(("%d frames, slowest step %.2f ms, %d of %d lines answered"):format(frame, worst * 1000, ok, #requests))
os.execute("rm -rf '" .. dir .. "'")   -- this run's work directory: nothing left in /tmp
os.remove(base)
