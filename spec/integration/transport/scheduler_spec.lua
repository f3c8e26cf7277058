-- One scheduler, many clients: two services (the dashscope and openai
-- dialects, each with its own key) on one multi handle, driven the way a
-- host drives it, waiting on one descriptor; and a cancelled wait that
-- stops asking for its batch.
local H = require "helper"
local lbatch = require "lbatch"
local uv = require "luv"

local function stats(emu) return (select(2, H.json("GET", emu.url .. "/_emulator/stats", { cacert = emu.tls }))) end

describe("one scheduler for two clients", function()
  local ds, oa
  setup(function()
    ds = H.emulator({ dialect = "dashscope", api_key = "ds-key-0123456789abcdef", speed = 50 })
    oa = H.emulator({ dialect = "openai", api_key = "oa-key-0123456789abcdef", speed = 50 })
  end)
  teardown(function() ds.stop() oa.stop() end)

  it("interleaves both clients' uploads, creates and waits on one multi handle, woken through one pollfd", function()
    local sched = lbatch.scheduler({ max_connections = 4 })
    local a = assert(lbatch.new({ api_key = "ds-key-0123456789abcdef", base_url = ds.base, scheduler = sched }))
    local b = assert(lbatch.new({ api_key = "oa-key-0123456789abcdef", base_url = oa.base, region = "openai",
                                  scheduler = sched }))
    assert.are.equal(sched, a.scheduler)
    assert.are.equal(sched, b.scheduler)
    -- the one descriptor: every client's is the scheduler's
    local fd = sched:pollfd()
    assert.are.equal(fd, a:pollfd())
    assert.are.equal(fd, b:pollfd())

    local dir = H.tmpdir()
    local order, done = {}, {}
    local function job(client, name, n)
      return sched:spawn(function()
        for i = 1, n do
          local path = H.requests(("%s/%s-%d.jsonl"):format(dir, name, i), 3,
                                  { url = "/v1/chat/completions", model = "qwen-plus" })
          local f = assert(client:upload(path))
          order[#order + 1] = name .. " upload"
          local bt = assert(client:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
          order[#order + 1] = name .. " create"
          local fin = assert(client:wait(bt.id, { interval = 0.05, factor = 1, jitter = 0 }))
          order[#order + 1] = name .. " wait"
          done[#done + 1] = { name = name, status = fin.status, id = fin.id }
        end
      end)
    end
    local ta, tb = job(a, "ds", 3), job(b, "oa", 3)

    -- a host's loop: a luv poll on the scheduler's descriptor and a timer
    -- from its timeout(), nothing else
    local poll, timer = uv.new_poll(fd), uv.new_timer()
    local wakeups, failure = 0, nil
    local function pump()
      wakeups = wakeups + 1
      local pending, err = sched:step()
      if err then failure = err end
      if pending == 0 or failure then poll:stop() timer:stop() return end
      local ms = sched:timeout()
      timer:stop()
      if ms >= 0 then timer:start(ms, 0, pump) end
    end
    poll:start("r", pump)
    timer:start(0, 0, pump)
    uv.run()
    poll:close() timer:close()
    uv.run()
    assert.is_nil(failure)
    assert.is_true(ta:done() and tb:done())
    assert.is_nil(select(2, ta:join()))
    assert.is_nil(select(2, tb:join()))
    assert.are.equal(6, #done)
    for _, d in ipairs(done) do assert.are.equal("completed", d.status) end

    -- the two jobs interleaved: neither ran all its steps before the other began
    local first_oa, last_ds
    for i, step in ipairs(order) do
      if step:sub(1, 2) == "oa" and not first_oa then first_oa = i end
      if step:sub(1, 2) == "ds" then last_ds = i end
    end
    assert.is_true(first_oa < last_ds, table.concat(order, ", "))

    -- each key reached only its own server (each answers 401 to any other
    -- key, and every call succeeded), and each server saw only its client's work
    for emu, want in pairs({ [ds] = "ds", [oa] = "oa" }) do
      local routes = stats(emu).routes
      assert.are.equal(3, routes["POST /files"], want)
      assert.are.equal(3, routes["POST /batches"], want)
    end
    for _, d in ipairs(done) do
      local mine = d.name == "ds" and a or b
      local other = d.name == "ds" and b or a
      assert.are.equal(d.id, assert(mine:retrieve(d.id)).id)
      local v, err = other:retrieve(d.id)      -- the other service does not know it
      assert.is_nil(v)
      assert.is_true(err.status == 404 or err.status == 400, tostring(err))
    end
    assert.is_true(wakeups < 2000, ("%d wake-ups: the host spins"):format(wakeups))
    a:close() b:close()
    -- a client on a shared scheduler closes alone: the other goes on
    local c = assert(lbatch.new({ api_key = "oa-key-0123456789abcdef", base_url = oa.base, region = "openai",
                                  scheduler = sched }))
    assert.is_truthy(c:list_batches({ limit = 1 }))
    sched:close()
  end)

  it("refuses the scheduler's options beside scheduler =, and a scheduler that is not one", function()
    local sched = lbatch.scheduler()
    assert.has_error(function() lbatch.new({ api_key = "k", scheduler = sched, max_connections = 2 }) end)
    assert.has_error(function() lbatch.new({ api_key = "k", scheduler = {} }) end)
    assert.has_error(function() lbatch.scheduler({ max_conections = 2 }) end)
    sched:close()
  end)
end)

describe("a cancelled wait", function()
  it("stops its batch's status calls: none goes out after the cancel, while another wait goes on polling", function()
    local emu = H.emulator({ speed = 1 })          -- a batch takes many seconds: it stays in progress
    local c = assert(lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 }))
    local dir = H.tmpdir()
    local f = assert(c:upload(H.requests(dir .. "/r.jsonl", 50, { url = "/v1/chat/completions", model = "qwen-plus" })))
    local one = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id
    local two = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" })).id
    local o = { interval = 0.05, factor = 1, jitter = 0, deadline = 30 }
    local waiting = c:spawn(function() return c:wait(one, o) end)
    local other = c:spawn(function() return c:wait(two, o) end)
    local polled
    -- events, not fixed sleeps: on a loaded machine a poll may take far longer than its interval
    local function polled_now()
      local p = stats(emu).polled
      return type(p) == "table" and p or {}        -- none yet: JSON null
    end
    local function until_polled(id, n)
      local deadline = H.now() + 30
      -- (H.json blocks the loop: a step of 0.25 s leaves the waits time to poll between looks)
      while (polled_now()[id] or 0) < n and H.now() < deadline do c:sleep(0.25) end
    end
    c:spawn(function()
      until_polled(one, 3)
      local before = stats(emu).polled or {}
      assert.is_true((before[one] or 0) >= 3, "the wait polled before the cancel")
      assert.is_true(waiting:cancel())
      c:sleep(0.1)                                  -- a call already in flight may land
      local now_polled = polled_now()
      local at_cancel = now_polled[one]
      until_polled(two, (now_polled[two] or 0) + 10)  -- while the other wait polls 10 times more
      polled = { at_cancel = at_cancel, after = stats(emu).polled[one],
                 other_before = before[two] or 0, other_after = stats(emu).polled[two] }
      other:cancel()
    end)
    assert(c:run())
    assert.are.equal(polled.at_cancel, polled.after, "status calls for the cancelled wait's batch after the cancel")
    assert.is_true(polled.other_after - polled.other_before >= 10, ("the other wait kept polling (%d -> %d; %s: %d -> %d)")
      :format(polled.other_before, polled.other_after, "cancelled", polled.at_cancel, polled.after))
    local _, err = waiting:join()
    assert.are.equal("cancelled", err.kind)
    assert.are.equal(0, c:watcher().count)
    c:close()
    emu.stop()
  end)
end)
