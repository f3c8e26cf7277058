-- One owner per work directory (lbatch.lock): two real `lbatch run` (or
-- `lbatch flow`) started together on one --dir against the emulator send
-- each shard once, the second stops at once naming the first's pid, or
-- waits for it with --wait-lock; a run killed with kill -9 leaves a lock
-- file that blocks nobody.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local CHAT = { url = "/v1/chat/completions", model = "qwen-plus" }

local function routes(emu)
  local s = emu.stats()
  return s.routes ~= cjson.null and s.routes or {}
end

-- a command line of bin/lbatch against emu, its pid written to pidfile first
local function command(emu, args, pidfile)
  local cmd = H.lbatch_cmd(args, { emu = emu })
  return ("sh -c %s"):format(H.q(("echo $$ > %s; exec %s"):format(pidfile, cmd)))
end

-- two commands started together (the second `delay` seconds later): for
-- each, {code, out (stdout and stderr), pid}
local function together(emu, dir, args1, args2, delay)
  local out = H.sh(("%s >%s/o1 2>&1 & p1=$!; sleep %s; %s >%s/o2 2>&1 & p2=$!; wait $p1; echo e1=$?; wait $p2; "
    .. "echo e2=$?"):format(command(emu, args1, dir .. "/p1"), dir, delay or 0, command(emu, args2, dir .. "/p2"), dir))
  local r = {}
  for i = 1, 2 do
    r[i] = { code = tonumber(out:match("e" .. i .. "=(%d+)")), out = H.read(("%s/o%d"):format(dir, i)),
             pid = tonumber(H.read(("%s/p%d"):format(dir, i))) }
  end
  return r
end

-- the one that ran and the one that was stopped
local function winner_loser(r)
  assert.are.same({ 0, 1 }, { math.min(r[1].code, r[2].code), math.max(r[1].code, r[2].code) },
    r[1].out .. "\n---\n" .. r[2].out)
  if r[1].code == 0 then return r[1], r[2] end
  return r[2], r[1]
end

-- the lines of every batch the emulator holds
local function lines_sent(emu)
  local n, after = 0, nil
  repeat
    local _, page = H.json("GET", emu.base .. "/batches?limit=100" .. (after and ("&after=" .. after) or ""))
    for _, b in ipairs(page.data) do
      n = n + b.request_counts.total
      after = b.id
    end
  until not page.has_more
  return n
end

describe("one owner per work directory", function()
  local emu, dir
  before_each(function()
    emu = H.emulator({ rate_limits = false })
    dir = H.tmpdir()
  end)
  after_each(function()
    emu.stop()
    H.rm_rf(dir)
  end)

  it("two lbatch run on one --dir started together: each shard created once, the second stops naming the pid", function()
    local input = H.requests(dir .. "/in.jsonl", 60, CHAT)
    local args = ("run %s --dir %s/work --poll 0.05 --max-lines 10"):format(input, dir)
    local won, lost = winner_loser(together(emu, dir, args, args))
    assert.matches("60 requests, 60 ok", won.out)
    assert.matches("lbatch run: busy dir_locked: ", lost.out, 1, true)
    assert.matches("in use by pid " .. won.pid .. " on ", lost.out, 1, true)
    assert.matches("--wait-lock", lost.out, 1, true)
    local r = routes(emu)
    assert.are.equal(6, r["POST /files"])
    assert.are.equal(6, r["POST /batches"])
  end)

  it("with --wait-lock the second waits for the first, then finds the run done: nothing sent twice", function()
    local input = H.requests(dir .. "/in.jsonl", 60, CHAT)
    local args = ("run %s --dir %s/work --poll 0.05 --max-lines 10"):format(input, dir)
    local r = together(emu, dir, args, args .. " --wait-lock 120", 0.3)
    assert.are.equal(0, r[1].code, r[1].out)
    assert.are.equal(0, r[2].code, r[2].out)
    assert.matches("60 requests, 60 ok", r[2].out)
    local rt = routes(emu)
    assert.are.equal(6, rt["POST /files"])
    assert.are.equal(6, rt["POST /batches"])
  end)

  it("two lbatch flow on one --dir started together: each ask sent once, the second stops naming the pid", function()
    local f = assert(io.open(dir .. "/items.jsonl", "wb"))
    for i = 1, 40 do
      f:write(cjson.encode({ id = ("q%03d"):format(i), question = ("Question %d: what is %d + %d?"):format(i, i, i) }),
        "\n")
    end
    f:close()
    local args = ("flow %s/spec/fixtures/judge_flow.lua --items %s/items.jsonl --dir %s/work --poll 0.05 "
      .. "--max-lines 15 --json"):format(H.root, dir, dir)
    local won, lost = winner_loser(together(emu, dir, args, args))
    local report = cjson.decode(won.out:match("{[^\n]*}"))
    assert.are.equal(40, report.items)
    assert.matches('"code":"dir_locked"', lost.out, 1, true)
    assert.matches("in use by pid " .. won.pid .. " on ", lost.out, 1, true)
    assert.are.equal(report.asks, lines_sent(emu))
  end)

  it("a run killed with kill -9 leaves a lock file that does not block the next run", function()
    local input = H.requests(dir .. "/in.jsonl", 60, CHAT)
    -- (--recover-window 8: the second run looks for a create the kill cut
    -- off for 8 s, not 45, before it sends it again; the emulator makes a
    -- step at once, 8 s leaves room for a loaded machine)
    local args = ("run %s --dir %s/work --poll 0.05 --max-lines 10 --recover-window 8"):format(input, dir)
    -- every status call held 20 s, retrieve (/v1/batches/ID) and list
    -- (/v1/batches?...) alike: the run cannot learn that a batch is done, so
    -- it is still going when it is killed, however fast the rest is
    H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "GET", path = "^/v1/batches", delay = 20, times = 1000 } })
    H.sh(("%s >%s/o1 2>&1 &"):format(command(emu, args, dir .. "/p1"), dir))
    local t0 = H.now()
    while (routes(emu)["POST /batches"] or 0) < 1 and H.now() - t0 < 30 do H.sleep(0.02) end
    local pid = tonumber(H.read(dir .. "/p1"))
    assert.is_true(H.running(pid), "the run had ended before it could be killed:\n" .. (H.read(dir .. "/o1") or ""))
    assert.is_true(H.ok("kill -9 " .. pid))
    H.http("DELETE", emu.url .. "/_emulator/faults")
    H.sleep(0.2)
    assert.are.equal(pid, cjson.decode(H.read(dir .. "/work/lock")).pid)   -- its holder, left behind
    local out = H.sh(command(emu, args, dir .. "/p2") .. " 2>&1; echo exit=$?")
    assert.matches("exit=0", out)
    assert.matches("60 requests, 60 ok", out)
    -- what was made, not what was asked: a request the kill cut off before
    -- its body went out reached the emulator (and is counted in its routes)
    -- but made nothing, and the second run may then send it again
    -- (H.made_once); each request that came whole made something, once
    local why = ("routes %s, cut %s\nsecond run:\n%s"):format(cjson.encode(routes(emu)),
      cjson.encode(select(2, H.whole(emu))), out)
    H.made_once(emu, 6, 6, why)
    local whole = H.whole(emu)
    assert.are.same({ 6, 6 }, { whole["POST /files"], whole["POST /batches"] }, why)
  end)

  it("lbatch adopt on a directory in use stops at once, naming the holder, and sends nothing", function()
    local input = H.requests(dir .. "/in.jsonl", 20, CHAT)
    H.mkdir(dir .. "/work")
    local held = assert(require("lbatch.core").lock(dir .. "/work/lock"))
    local out = H.sh(command(emu, ("adopt %s --dir %s/work --run abc123"):format(input, dir), dir .. "/p1")
      .. " 2>&1; echo exit=$?")
    held:release()
    assert.matches("exit=1", out)
    assert.matches("lbatch adopt: busy dir_locked: ", out, 1, true)
    assert.matches("in use by pid " .. H.pid .. " on ", out, 1, true)
    assert.is_false(H.exists(dir .. "/work/journal.jsonl"))
    assert.are.same({}, routes(emu))
  end)

  it("the library's wait_lock waits on the client's loop, its other tasks running", function()
    local input = H.requests(dir .. "/in.jsonl", 20, CHAT)
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    H.mkdir(dir .. "/work")
    local held = assert(require("lbatch.core").lock(dir .. "/work/lock"))
    local released_at, first_upload, ticks = nil, nil, 0
    -- released once the other task has ticked 12 times: a loop blocked by the wait never gets there (the
    -- run then stops busy after its 30 s), however slow the machine
    client:spawn(function()
      repeat client:sleep(0.05) until ticks >= 12
      released_at = H.now()
      held:release()
    end)
    client:spawn(function()
      while not released_at do ticks = ticks + 1 client:sleep(0.05) end
    end)
    local busy, err = pipeline.run({ client = client, requests = input, dir = dir .. "/work", max_lines = 10,
      poll_interval = 0.05, wait_lock = 0.1 })
    assert.is_nil(busy)
    assert.are.same({ "busy", "dir_locked" }, { err.kind, err.code })
    assert.matches("after waiting 0.1s", err.message, 1, true)
    local report = assert(pipeline.run({ client = client, requests = input, dir = dir .. "/work", max_lines = 10,
      poll_interval = 0.05, wait_lock = 30, on_step = function(step)
        if step == "before_upload" and not first_upload then first_upload = H.now() end
      end }))
    assert.are.equal(2, #report.shards)
    assert.is_true(first_upload >= released_at, "uploaded while the lock was held")
    assert.is_true(ticks >= 5, ("the loop was blocked while waiting: %d ticks"):format(ticks))
    client:close()
  end)
end)
