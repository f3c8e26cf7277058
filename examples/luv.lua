-- An event loop (luv, Debian lua-luv) drives lbatch without polling: it
-- waits on the client's descriptor and its timeout, then calls step().
-- The host's notify starts a turn when work is queued from outside.
--
--   emulator/around lua5.4 examples/luv.lua
local uv = require "luv"
local lbatch = require "lbatch"

local poll, timer = nil, uv.new_timer()
local wakeups = 0
local pump

local client = lbatch.new({ host = {
  notify = function() timer:stop() timer:start(0, 0, pump) end,   -- work queued: a turn soon
} })

function pump()
  wakeups = wakeups + 1
  local pending, failure = client:step()
  if failure then error(failure) end
  if pending == 0 then poll:stop() timer:stop() return end
  local ms = client:timeout()                -- -1: only the descriptor can bring work
  timer:stop()
  if ms >= 0 then timer:start(ms, 0, pump) end
end

poll = uv.new_poll(client:pollfd())         -- readable when a transfer has work
poll:start("r", pump)
client:spawn(function()                     -- notify() schedules the first turn
  local page = assert(client:list_batches({ limit = 5 }))
  print(("%d batch(es) on %s"):format(#page.data, client.base_url))
end)
uv.run()
poll:close() timer:close()
uv.run()
client:close()
print(("woken %d times"):format(wakeups))
