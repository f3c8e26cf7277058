--- An append-only journal of JSON records, one per line.
--
-- Used by the pipeline (its steps) and by the emulator (its state). Opening
-- replays the records (a torn last line, left by a process killed in the
-- middle of a write, is skipped), then writes the live state back compacted
-- (to a temp file beside it, renamed over) and reopens it for appending.
--
--    local j, err = journal.open(path, function(rec) ... end)   -- replay
--    j:compact(records)           -- the live state, as a list of records
--    j:append(rec, rec2, ...)     -- one write for them all
--    j:close()
-- @module lbatch.journal
local cjson = require "cjson"
local errors = require "lbatch.errors"

local M = {}

local Journal = {}
Journal.__index = Journal

--- Replay a journal and open it for appending.
-- @tparam string path the journal (created when missing)
-- @tparam ?function replay called with each record, in order
-- @treturn table the journal, or nil and an `io` error
function M.open(path, replay)
  local fh = io.open(path, "rb")
  if fh then
    if replay then
      for line in fh:lines() do
        local ok, rec = pcall(cjson.decode, line)
        if ok and type(rec) == "table" then replay(rec) end
      end
    end
    fh:close()
  end
  local log, msg = io.open(path, "ab")
  if not log then return nil, errors.io("cannot write", path, msg) end
  return setmetatable({ path = path, log = log, appended = 0 }, Journal)
end

local function lines(records)
  local t = {}
  for i, rec in ipairs(records) do t[i] = cjson.encode(rec) end
  t[#t + 1] = ""
  return table.concat(t, "\n")
end

--- Replace the journal with `records` (written aside, then renamed over).
-- @tparam {table,...} records the live state
-- @treturn true, or nil and an `io` error
function Journal:compact(records)
  local tmp = self.path .. ".tmp"
  local f, msg = io.open(tmp, "wb")
  if not f then return nil, errors.io("cannot write", tmp, msg) end
  local ok, werr = f:write(lines(records))
  local closed, cerr = f:close()
  if not ok or not closed then
    os.remove(tmp)
    return nil, errors.io("cannot write", tmp, werr or cerr)
  end
  local renamed, rerr = os.rename(tmp, self.path)
  if not renamed then
    os.remove(tmp)
    return nil, errors.io("cannot rename " .. tmp .. " to", self.path, rerr)
  end
  self.log:close()
  local log
  log, msg = io.open(self.path, "ab")
  if not log then return nil, errors.io("cannot write", self.path, msg) end
  self.log, self.appended = log, 0
  return true
end

--- Append records in one write, flushed. `appended` counts the records
-- since the last compaction.
-- @tparam table ... records
-- @treturn true, or nil and an `io` error
function Journal:append(...)
  self.appended = self.appended + select("#", ...)
  local ok, msg = self.log:write(lines({ ... }))
  if ok then ok, msg = self.log:flush() end
  if not ok then return nil, errors.io("cannot write", self.path, msg) end
  return true
end

--- Close the journal.
function Journal:close()
  if self.log then self.log:close() self.log = nil end
end

return M
