-- cqueues (Debian lua-cqueues) drives lbatch without polling: a cqueues
-- coroutine waits on the client's pollable (descriptor and timeout), then
-- calls step(). Other cqueues coroutines run meanwhile.
--
--   emulator/around lua5.4 examples/cqueues.lua
local cqueues = require "cqueues"
local lbatch = require "lbatch"

local client = lbatch.new()
client:spawn(function()
  local page = assert(client:list_batches({ limit = 5 }))
  print(("%d batch(es) on %s"):format(#page.data, client.base_url))
  client:sleep(0.2)                         -- a timer: the pollable's timeout wakes cqueues
end)

local cq = cqueues.new()
local wakeups, ticks = 0, 0
cq:wrap(function()                          -- lbatch's driver
  local pollable = client:pollable()
  while true do
    wakeups = wakeups + 1
    local pending, failure = client:step()
    if failure then error(failure) end
    if pending == 0 then break end
    cqueues.poll(pollable)
  end
end)
cq:wrap(function()                          -- the host's own work goes on
  for _ = 1, 5 do ticks = ticks + 1 cqueues.sleep(0.01) end
end)
assert(cq:loop())
client:close()
print(("woken %d times, %d ticks of other work"):format(wakeups, ticks))
