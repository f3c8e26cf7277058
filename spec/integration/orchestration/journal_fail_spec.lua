-- The journal before the money: a pipeline whose journal cannot be written
-- (its file system full, a real tmpfs) stops before its next upload or
-- create, and the run again, with room, sends each shard once. The same
-- for a flow's pipelines.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"
local cjson = require "cjson"

local CHAT = { url = "/v1/chat/completions", model = "qwen-plus" }

local function routes(emu)
  local s = emu.stats()
  return s.routes ~= cjson.null and s.routes or {}
end

-- A small file system of its own (tmpfs: the specs run as root, in CI too);
-- nil when this machine does not let us mount one.
local function small_fs(kb)
  local mnt = H.tmpdir()
  if not H.ok(("mount -t tmpfs -o size=%dk tmpfs %s 2>/dev/null"):format(kb, H.q(mnt))) then
    H.ok("rmdir " .. H.q(mnt))
    return nil
  end
  return mnt, function() H.ok("umount " .. H.q(mnt) .. " && rmdir " .. H.q(mnt)) end
end

-- the file system full, the journal's last page too (a file's last page
-- takes appends while it has room): empty lines, which a replay skips
local function fill(mnt, journal)
  H.ok(("dd if=/dev/zero of=%s/fill bs=4k 2>/dev/null"):format(H.q(mnt)))
  H.ok(("yes '' | head -c 8192 >> %s 2>/dev/null"):format(H.q(journal or (mnt .. "/journal.jsonl"))))
end

local function ok_lines(report)
  local n = 0
  for rec in report.results:each() do if rec.ok then n = n + 1 end end
  return n
end

describe("a pipeline whose journal cannot be written", function()
  local emu, dir, mnt, unmount
  before_each(function()
    emu = H.emulator({ speed = 2000, rate_limits = false })   -- (steps, not timing, are under test)
    dir = H.tmpdir()
    mnt, unmount = small_fs(256)
  end)
  after_each(function()
    emu.stop()
    if unmount then unmount() end
    H.rm_rf(dir)
  end)

  -- a run of 6 shards of 10 lines, one at a time, its journal on the small
  -- file system, which fills up when `at` is reached for shard `k`
  local function run_filling(client, input, at, k)
    return pipeline.run({ client = client, requests = input, dir = dir .. "/work", journal = mnt .. "/journal.jsonl",
      max_lines = 10, max_in_flight = 1, poll_interval = 0.05, max_poll_interval = 0.1,
      on_step = function(step, s) if step == at and s.k == k then fill(mnt) end end })
  end

  local function rerun(client, input)
    os.remove(mnt .. "/fill")
    return assert(pipeline.run({ client = client, requests = input, dir = dir .. "/work",
      journal = mnt .. "/journal.jsonl", max_lines = 10, poll_interval = 0.05, max_poll_interval = 0.1 }))
  end

  it("stops before the upload whose record could not be written; the rerun sends each shard once", function()
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    local input = H.requests(dir .. "/in.jsonl", 60, CHAT)
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local report, err = run_filling(client, input, "before_upload", 3)
    assert.is_nil(report)
    assert.are.equal("io", err.kind)
    assert.matches("No space left on device", err.message)
    local r = routes(emu)
    assert.are.equal(2, r["POST /files"])        -- shard 3's upload never went out
    assert.are.equal(2, r["POST /batches"])
    report = rerun(client, input)
    assert.are.equal(60, ok_lines(report))
    r = routes(emu)
    assert.are.equal(6, r["POST /files"])
    assert.are.equal(6, r["POST /batches"])
    client:close()
  end)

  it("stops when a create's answer cannot be written: nothing more is sent, the rerun finds the batch", function()
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    local input = H.requests(dir .. "/in.jsonl", 60, CHAT)
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local report, err = run_filling(client, input, "after_create", 2)
    assert.is_nil(report)
    assert.are.equal("io", err.kind)
    local r = routes(emu)
    assert.are.equal(2, r["POST /files"])
    assert.are.equal(2, r["POST /batches"])
    report = rerun(client, input)
    assert.are.equal(60, ok_lines(report))
    r = routes(emu)
    assert.are.equal(6, r["POST /files"])
    assert.are.equal(6, r["POST /batches"])      -- shard 2's batch found, not made again
    client:close()
  end)

  it("with shards at once, stops every one before its next request", function()
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    local input = H.requests(dir .. "/in.jsonl", 80, CHAT)
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local filled = false
    local report, err = pipeline.run({ client = client, requests = input, dir = dir .. "/work",
      journal = mnt .. "/journal.jsonl", max_lines = 10, max_in_flight = 4, poll_interval = 0.05,
      on_step = function(step)
        if step == "after_upload" and not filled then
          filled = true
          fill(mnt)
        end
      end })
    assert.is_nil(report)
    assert.are.equal("io", err.kind)
    local r = routes(emu)
    -- the uploads already out ended, unrecorded; no create, no other upload started
    assert.is_true(r["POST /files"] <= 4, r["POST /files"])
    assert.is_nil(r["POST /batches"], tostring(err))
    report = rerun(client, input)
    assert.are.equal(80, ok_lines(report))
    -- the stopped workers' transfers were dropped: an upload dropped after
    -- its headers was counted and made nothing, and the rerun rightly sends
    -- it again. What was made, once each, and each request that came whole:
    local why = cjson.encode(emu.stats())
    H.made_once(emu, 8, 8, why)
    local whole = H.whole(emu)
    assert.are.same({ 8, 8 }, { whole["POST /files"], whole["POST /batches"] }, why)
    client:close()
  end)
end)

describe("a flow whose round's journal cannot be written", function()
  local flow = require "lbatch.flow"
  local judge = dofile(H.root .. "/spec/fixtures/judge_flow.lua")

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

  it("stops before its next upload; the rerun with room sends each ask once", function()
    local mnt, unmount = small_fs(2048)
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    local emu = H.emulator({ speed = 2000, rate_limits = false })
    finally(function() emu.stop() unmount() end)
    local items = {}
    for i = 1, 40 do items[i] = { id = ("q%03d"):format(i), question = ("Question %d: what is %d + %d?"):format(i, i, i) } end
    local client = assert(lbatch.new({ api_key = "k", base_url = emu.base }))
    local dir, filled = mnt .. "/flow", false
    local function opts(on_step)
      return { client = client, dir = dir, items = items, key = judge.key, step = judge.step, max_lines = 10,
               max_in_flight = 1, poll_interval = 0.05, max_poll_interval = 0.1, on_step = on_step }
    end
    local report, err = flow.run(opts(function(step, s)
      if step == "before_upload" and s.k == 2 and not filled then
        filled = true
        fill(mnt, dir .. "/round-1/batches/journal.jsonl")
      end
    end))
    assert.is_nil(report)
    assert.are.equal("io", err.kind)
    local r = routes(emu)
    assert.are.equal(1, r["POST /files"])        -- the second shard's upload never went out
    assert.are.equal(1, r["POST /batches"])
    os.remove(mnt .. "/fill")
    report = assert(flow.run(opts()))
    assert.are.equal(40, report.done)
    assert.are.equal(report.asks, lines_sent(emu))
    assert.are.equal(report.batches, routes(emu)["POST /batches"])   -- each shard created once
    client:close()
  end)
end)
