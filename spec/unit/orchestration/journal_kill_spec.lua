-- A journal's compaction killed (kill -9) at each point of it: after the
-- temp file is opened, written, closed, synced, renamed over the journal,
-- the directory synced, the journal reopened. A fresh process then reads
-- the journal: every record's last state is there, once; the next run
-- compacts and appends over what the killed one left.
-- (The kill points: LBATCH_SPEC_ONLY_KILL_REPLACE_AT, read by lbatch/impl/orchestration/journal.lua.)
local H = require "helper"
local journal = require "lbatch.impl.orchestration.journal"

local KEYS, UPDATES = 20, 3

-- the child: replays the journal, appends KEYS x UPDATES records when it is
-- new, compacts its live state, appends one more record
local CHILD = [[
local journal = require "lbatch.impl.orchestration.journal"
local path = arg[1]
local live, order = {}, {}
local j = assert(journal.open(path, function(rec)
  if not live[rec.key] then order[#order + 1] = rec.key end
  live[rec.key] = rec
end))
if #order == 0 then
  for u = 1, UPDATES do
    for k = 1, KEYS do
      local rec = { key = "k" .. k, update = u, text = ("x"):rep(200) }
      assert(j:append(rec))
      if u == 1 then order[#order + 1] = rec.key end
      live[rec.key] = rec
    end
  end
end
local recs = {}
for i, key in ipairs(order) do recs[i] = live[key] end
print("compacting")
assert(j:compact(recs))
assert(j:append({ key = "after", update = 1 }))
j:close()
print("finished")
]]

local function child(script, path, kill_at)
  local env = kill_at and ("LBATCH_SPEC_ONLY_KILL_REPLACE_AT=" .. kill_at .. " ") or ""
  local cmd = ("cd %s && %sLUA_PATH=%s LUA_CPATH=%s %s %s %s 2>&1"):format(H.q(H.root), env, H.q(package.path),
    H.q(package.cpath), H.lua, H.q(script), H.q(path))
  local p = assert(io.popen(cmd))
  local out = p:read("*a")
  p:close()
  return out
end

-- the journal's lines: each key -> the records under it, in order
local function records(path)
  local by, n = {}, 0
  for line in io.lines(path) do
    n = n + 1
    local rec = require("cjson").decode(line)     -- every line whole: no torn line
    by[rec.key] = by[rec.key] or {}
    table.insert(by[rec.key], rec.update)
  end
  return by, n
end

describe("a journal's compaction killed with kill -9", function()
  local script
  setup(function()
    script = H.write(H.tmpdir() .. "/child.lua", "local KEYS, UPDATES = " .. KEYS .. ", " .. UPDATES .. "\n" .. CHILD)
  end)

  for at = 1, 7 do
    it(("at point %d loses nothing and doubles nothing"):format(at), function()
      local dir = H.tmpdir()
      local path = dir .. "/j.jsonl"
      local out = child(script, path, at)
      assert.matches("compacting", out)
      assert.is_nil(out:find("finished"), out)                -- it was killed in the compaction
      local by, n = records(path)
      -- before the rename the old journal whole, after it the compacted one
      local each = at <= 4 and { 1, 2, 3 } or { 3 }
      assert.are.equal(at <= 4 and KEYS * UPDATES or KEYS, n)
      for k = 1, KEYS do assert.are.same(each, by["k" .. k]) end
      assert.is_nil(by.after)
      -- a fresh process reads it, compacts it and goes on
      out = child(script, path)
      assert.matches("finished", out)
      by, n = records(path)
      assert.are.equal(KEYS + 1, n)
      for k = 1, KEYS do assert.are.same({ 3 }, by["k" .. k]) end
      assert.are.same({ 1 }, by.after)
      assert.is_false(H.exists(path .. ".tmp"))
      -- and what it reads through journal.open is the same
      local live = {}
      local j = assert(journal.open(path, function(rec) live[rec.key] = rec.update end))
      j:close()
      assert.are.equal(3, live.k1)
      assert.are.equal(1, live.after)
    end)
  end
end)
