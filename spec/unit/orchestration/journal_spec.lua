-- lbatch.journal: an append-only journal of JSON records (no server, no nginx).
local H = require "helper"
local journal = require "lbatch.impl.orchestration.journal"
local cjson = require "cjson"

local function replayed(path)
  local recs = {}
  local j = assert(journal.open(path, function(rec) recs[#recs + 1] = rec end))
  j:close()
  return recs
end

describe("journal", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rm_rf(dir) end)

  it("creates a missing journal, appends records in order, and replays them on open", function()
    local path = dir .. "/j.jsonl"
    local seen = 0
    local j = assert(journal.open(path, function() seen = seen + 1 end))
    assert.are.equal(0, seen)
    assert.is_true(H.exists(path))
    assert.is_true(j:append({ phase = "upload", n = 1 }))
    assert.is_true(j:append({ phase = "create", n = 2 }, { phase = "poll", n = 3 }))
    assert.are.equal(3, j.appended)
    -- flushed: another reader sees every record before close
    assert.are.same({ { phase = "upload", n = 1 }, { phase = "create", n = 2 }, { phase = "poll", n = 3 } },
                    replayed(path))
    j:close()
    j:close()                                   -- twice is harmless
    local text = H.read(path)
    assert.are.equal(3, select(2, text:gsub("\n", "")))   -- one line each, the last one ended
    assert.are.equal("\n", text:sub(-1))
  end)

  it("skips a torn last line and lines that are not objects", function()
    local path = H.write(dir .. "/j.jsonl", '{"a":1}\n7\n"x"\n\n{"b":2}\n{"c":')
    assert.are.same({ { a = 1 }, { b = 2 } }, replayed(path))
  end)

  it("compact: the live state replaces the journal, and appends follow it", function()
    local path = H.write(dir .. "/j.jsonl", '{"a":1}\n{"a":2}\n{"torn":')
    local state = {}
    local j = assert(journal.open(path, function(rec) state[#state + 1] = rec end))
    assert.are.same({ { a = 1 }, { a = 2 } }, state)
    assert.is_true(j:append({ a = 0 }))
    assert.are.equal(1, j.appended)
    assert.is_true(j:compact({ { a = 2 } }))
    assert.are.equal(0, j.appended)
    assert.is_false(H.exists(path .. ".tmp"))
    assert.are.equal('{"a":2}\n', H.read(path))
    assert.is_true(j:append({ a = 3 }))
    assert.are.equal(1, j.appended)
    j:close()
    assert.are.same({ { a = 2 }, { a = 3 } }, replayed(path))
    local k = assert(journal.open(path))
    assert.is_true(k:compact({}))
    k:close()
    assert.are.equal("", H.read(path))
  end)

  it("append_list writes a list of any length in one write; compact's pause runs every 4 records", function()
    local path = dir .. "/j.jsonl"
    local j = assert(journal.open(path))
    local recs = {}
    for i = 1, 40 do recs[i] = { n = i } end
    assert.is_true(j:append_list(recs))
    assert.is_true(j:append_list({}))
    assert.are.equal(40, j.appended)
    assert.are.same(recs, replayed(path))
    local paused = 0
    assert.is_true(j:compact(recs, function() paused = paused + 1 end))
    assert.are.equal(12, paused)       -- after records 4, 8, ..., 40, before the temp file's sync and after it
    assert.are.same(recs, replayed(path))
    j:close()
  end)

  it("opening without a replay function keeps the records", function()
    local path = H.write(dir .. "/j.jsonl", '{"a":1}\n')
    local j = assert(journal.open(path))
    assert.is_true(j:append({ a = 2 }))
    j:close()
    assert.are.same({ { a = 1 }, { a = 2 } }, replayed(path))
  end)

  it("a journal that cannot be written is an io error", function()
    local j, err = journal.open(dir .. "/missing/j.jsonl")
    assert.is_nil(j)
    assert.are.equal("io", err.kind)
    assert.are.equal(dir .. "/missing/j.jsonl", err.path)
    assert.matches("^cannot write ", err.message)
    assert.is_false(err.retryable)
  end)

  it("a compaction that cannot write aside fails as io and keeps the journal", function()
    local sub = H.mkdir(dir .. "/aside")
    local path = sub .. "/j.jsonl"
    local j = assert(journal.open(path))
    assert(j:append({ a = 1 }))
    H.mkdir(path .. ".tmp")                     -- the temp file's name is taken by a directory
    local ok, err = j:compact({ { b = 2 } })
    assert.is_nil(ok)
    assert.are.equal("io", err.kind)
    assert.is_true(j:append({ a = 2 }))         -- still open for appending
    j:close()
    assert.are.same({ { a = 1 }, { a = 2 } }, replayed(path))
  end)

  it("a compaction that cannot rename over the journal fails as io, leaves no temp file, keeps appending", function()
    local path = dir .. "/j.jsonl"
    local j = assert(journal.open(path))
    assert(j:append({ a = 1 }))
    -- the journal's name taken by a directory that is not empty: the rename fails
    local moved = dir .. "/j.moved"
    assert(os.rename(path, moved))
    H.mkdir(path)
    H.write(path .. "/x", "x")
    local ok, err = j:compact({ { b = 2 } })
    assert.is_nil(ok)
    assert.are.equal("io", err.kind)
    assert.matches("cannot rename", err.message)
    assert.is_false(H.exists(path .. ".tmp"))
    assert.is_true(j:append({ a = 2 }))         -- the journal it had stays open
    j:close()
    assert.are.same({ { a = 1 }, { a = 2 } }, replayed(moved))
  end)
end)

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

local function fill(mnt) H.ok(("dd if=/dev/zero of=%s/fill bs=4k 2>/dev/null"):format(H.q(mnt))) end

describe("journal, its writes failing", function()
  it("a write that fails on a full disk breaks the journal: later appends and compactions fail, write nothing", function()
    local mnt, unmount = small_fs(64)
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    finally(unmount)
    local path = mnt .. "/j.jsonl"
    local j = assert(journal.open(path, nil, { durable = true }))
    assert.is_true(j:append({ a = 1 }))
    assert.is_true(j:sync())
    fill(mnt)
    local ok, err = j:append({ a = 2, pad = ("x"):rep(8192) })
    assert.is_nil(ok)
    assert.are.same({ "io", path }, { err.kind, err.path })
    assert.matches("No space left on device", err.message)
    os.remove(mnt .. "/fill")                       -- room again: the journal stays broken
    assert.are.same({ nil, err }, { j:append({ a = 3 }) })
    assert.are.same({ nil, err }, { j:sync() })
    assert.are.same({ nil, err }, { j:compact({ { a = 4 } }) })
    j:close()
    local recs = {}
    assert(journal.open(path, function(rec) recs[#recs + 1] = rec end)):close()
    assert.are.equal(1, recs[1].a)
    for _, rec in ipairs(recs) do assert.are_not.equal(3, rec.a) end
  end)

  it("a write that fails after many that passed (LuaJIT: compiled code) is still a failure", function()
    local mnt, unmount = small_fs(1024)
    if not mnt then return pending("cannot mount a tmpfs here (not root)") end
    finally(unmount)
    local path = mnt .. "/j.jsonl"
    local failed = 0
    for round = 1, 6 do
      local j = assert(journal.open(path))
      for i = 1, 200 do assert(j:append({ round = round, i = i })) end
      fill(mnt)
      -- the file's last page too: appends would fit there
      H.ok(("yes '' | head -c 8192 >> %s 2>/dev/null"):format(H.q(path)))
      local ok, err = j:append({ round = round, last = true })
      if not ok and err.kind == "io" then failed = failed + 1 end
      j:close()
      os.remove(mnt .. "/fill")
      os.remove(path)
    end
    assert.are.equal(6, failed)
  end)

  it("a torn last line is ended before the next append, which is not lost with it", function()
    local dir = H.tmpdir()
    finally(function() H.rm_rf(dir) end)
    local path = H.write(dir .. "/j.jsonl", '{"a":1}\n{"a":2,"pad":"xx')
    local j = assert(journal.open(path))
    assert.is_true(j:append({ a = 3 }))
    assert.is_true(j:append({ a = 4 }))
    j:close()
    local recs = {}
    assert(journal.open(path, function(rec) recs[#recs + 1] = rec.a end)):close()
    assert.are.same({ 1, 3, 4 }, recs)
  end)

  -- run SCRIPT under strace (fsync, rename[, write]) and name what it did to
  -- PATH and DIR, in order: "fsync tmp", "rename", "fsync dir", "fsync"
  -- (PATH itself), "appended" (a write of that word)
  local function traced(dir, path, script, calls)
    local trace = dir .. "/trace"
    assert.is_true(H.ok(("strace -f -y -e trace=%s -o %s %s %s 2>/dev/null"):format(calls, trace, H.lua, script)))
    local seen = {}
    for line in io.lines(trace) do
      local fsync = line:find("fsync(", 1, true)
      if fsync and line:find(path .. ".tmp>", 1, true) then seen[#seen + 1] = "fsync tmp"
      elseif line:find("rename(", 1, true) then seen[#seen + 1] = "rename"
      elseif fsync and line:find("<" .. dir .. ">", 1, true) then seen[#seen + 1] = "fsync dir"
      elseif line:find("appended", 1, true) then seen[#seen + 1] = "appended"
      elseif fsync and line:find("<" .. path .. ">", 1, true) then seen[#seen + 1] = "fsync"
      end
    end
    return seen
  end

  it("every writer of state replaces its file through journal.replace: synced, renamed, its directory synced (strace)", function()
    if not H.ok("command -v strace >/dev/null 2>&1") then return pending("strace is not installed") end
    local dir = H.tmpdir()
    finally(function() H.rm_rf(dir) end)
    local path = dir .. "/j.jsonl"
    local script = H.write(dir .. "/s.lua", ([[
      local journal = require "lbatch.impl.orchestration.journal"
      local j = assert(journal.open(%q))            -- not durable: a compaction is synced all the same
      assert(j:compact({ { a = 1 } }))
      j:close()
    ]]):format(path))
    assert.are.same({ "fsync tmp", "rename", "fsync dir" }, traced(dir, path, script, "fsync,rename"))
    -- and no other module renames a temp file of its own
    for file in H.sh("cd " .. H.root .. " && find lbatch -name '*.lua' | sort"):gmatch("[^\n]+") do
      if file ~= "lbatch/impl/orchestration/journal.lua" then
        assert.is_nil(H.read(H.root .. "/" .. file):find("os%.rename%(%s*tmp"), file)
      end
    end
  end)

  it("durable: a compaction reaches the disk before it returns; sync fsyncs what was appended (strace)", function()
    if not H.ok("command -v strace >/dev/null 2>&1") then return pending("strace is not installed") end
    local dir = H.tmpdir()
    finally(function() H.rm_rf(dir) end)
    local path = dir .. "/j.jsonl"
    local script = H.write(dir .. "/s.lua", ([[
      local journal = require "lbatch.impl.orchestration.journal"
      local j = assert(journal.open(%q, nil, { durable = true }))
      assert(j:compact({ { a = 1 } }))
      assert(j:append({ a = 2 }))
      io.stderr:write("appended\n")
      assert(j:sync())
      j:close()
    ]]):format(path))
    assert.are.same({ "fsync tmp", "rename", "fsync dir", "appended", "fsync" },
      traced(dir, path, script, "fsync,rename,write"))
    assert.are.equal('{"a":1}\n{"a":2}\n', H.read(path))
  end)
end)

describe("journal, a pipeline's records", function()
  it("one codec: the records of a state replay to that state, and report reads what the pipeline replays", function()
    local dir = H.tmpdir()
    finally(function() H.rm_rf(dir) end)
    local state = { version = 1, run = "r1", phase = "running", fp = "abc",
                    shards = { { step = "done", batch_id = "b1", output = "o1" }, { step = "upload", lines = 3 } } }
    local recs = journal.pipeline_records(state)
    assert.are.same({ format = "lbatch-pipeline", version = 2, run = "r1", phase = "running", fp = "abc" }, recs[1])
    assert.are.same({ index = 2, shard = state.shards[2] }, recs[3])
    local path = dir .. "/journal.jsonl"
    local j = assert(journal.open(path))
    assert(j:compact(recs))
    -- later changes, a record of another kind, and a torn last line
    assert(j:append(journal.shard_record(2, { step = "created", batch_id = "b2" }), { phase = "draining" },
                    { index = 3, shard = "x" }))
    j:close()
    local fh = assert(io.open(path, "ab"))
    fh:write('{"index":1,"shard":{"st')
    fh:close()
    local replay, got = journal.pipeline_replay()
    local k = assert(journal.open(path, replay))
    k:close()
    local want = { format = "lbatch-pipeline", version = 2, run = "r1", phase = "draining", fp = "abc",
                   shards = { { step = "done", batch_id = "b1", output = "o1" }, { step = "created", batch_id = "b2" } } }
    assert.are.same(want, got())
    assert.are.same(want, journal.read_pipeline(path))
    assert.are.same(want, require("lbatch.cmd.report").journal(dir))
    local none, err = journal.read_pipeline(dir .. "/nope.jsonl")
    assert.is_nil(none)
    assert.are.equal("io", err.kind)
    -- the pipeline, report and top decode no record of their own
    for _, file in ipairs({ "pipeline.lua", "cmd/report.lua", "cmd/top.lua" }) do
      local src = H.read(H.root .. "/lbatch/" .. file)
      assert.is_nil(src:find("rec%.k%f[^%w_]"), file)
      assert.is_nil(src:find("rec%.version"), file)
    end
  end)

  it("reads a version 1 journal (header {version = 1}, records {k, shard}) as this version's state", function()
    local dir = H.tmpdir()
    finally(function() H.ok("rm -rf " .. H.q(dir)) end)
    local path = H.write(dir .. "/journal.jsonl", '{"version":1,"run":"r0","phase":"running"}\n'
      .. '{"k":1,"shard":{"step":"written"}}\n{"k":2,"shard":{"step":"written"}}\n'
      .. '{"k":1,"shard":{"step":"done","output":"o1"}}\n{"phase":"done"}\n')
    local want = { format = "lbatch-pipeline", version = 2, run = "r0", phase = "done",
                   shards = { { step = "done", output = "o1" }, { step = "written" } } }
    assert.are.same(want, journal.read_pipeline(path))
    -- compacted, it is written in this version's format, and reads back the same
    local replay, got = journal.pipeline_replay()
    local j = assert(journal.open(path, replay))
    assert(j:compact(journal.pipeline_records(got())))
    j:close()
    local first = cjson.decode(io.lines(path)())
    assert.are.same({ "lbatch-pipeline", 2 }, { first.format, first.version })
    assert.is_nil(H.read(path):find('"k":'))
    assert.are.same(want, journal.read_pipeline(path))
    -- the fixture an older lbatch wrote (spec/fixtures/old-format/pipeline): one shard downloaded
    local old = journal.read_pipeline(H.root .. "/spec/fixtures/old-format/pipeline/work/journal.jsonl")
    assert.are.same({ "running", 3, "done", "written", "written" }, { old.phase, #old.shards, old.shards[1].step,
      old.shards[2].step, old.shards[3].step })
  end)

  it("refuses a journal of a newer version, by name, in every reader", function()
    local dir = H.tmpdir()
    finally(function() H.ok("rm -rf " .. H.q(dir)) end)
    local path = H.write(dir .. "/journal.jsonl", '{"format":"lbatch-pipeline","version":3,"run":"r9","phase":"done"}\n'
      .. '{"index":1,"shard":{"step":"done"}}\n')
    local want = path .. " is lbatch-pipeline version 3; this lbatch reads versions 1 to 2: run it with the lbatch "
      .. "that wrote it"
    for _, read in ipairs({ journal.read_pipeline, function() return require("lbatch.cmd.report").journal(dir) end }) do
      local st, err = read(path)
      assert.is_nil(st)
      assert.are.same({ "invalid", "journal_newer", want }, { err.kind, err.code, err.message })
    end
  end)
end)
