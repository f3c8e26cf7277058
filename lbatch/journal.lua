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
--    j:sync()                     -- what was appended, on the disk
--    j:close()
--
-- A write that fails leaves the journal broken: every later append and
-- compaction returns the same error, nothing more is written through it
-- (what a failed write left half written stays in the file as a torn
-- line, which the next open skips). Opened `durable`, a compaction reaches
-- the disk (the new file synced before it is renamed, then its directory)
-- before it returns.
-- @module lbatch.journal
local cjson = require "cjson"
local errors = require "lbatch.errors"

local M = {}

local Journal = {}
Journal.__index = Journal

--- Replay a journal and open it for appending.
-- @tparam string path the journal (created when missing)
-- @tparam ?function replay called with each record, in order
-- @tparam ?table opts durable (compactions synced)
-- @treturn table the journal, or nil and an `io` error
function M.open(path, replay, opts)
  local fh = io.open(path, "rb")
  local torn = false
  if fh then
    if replay then
      for line in fh:lines() do
        local ok, rec = pcall(cjson.decode, line)
        if ok and type(rec) == "table" then replay(rec) end
      end
    end
    local size = fh:seek("end")
    if size and size > 0 then
      fh:seek("set", size - 1)
      torn = fh:read(1) ~= "\n"
    end
    fh:close()
  end
  local log, msg = io.open(path, "ab")
  if not log then return nil, errors.io("cannot write", path, msg) end
  -- torn: the next append ends that line first, so that it is not glued to it
  return setmetatable({ path = path, log = log, appended = 0, torn = torn,
                        durable = opts and opts.durable or false }, Journal)
end

-- fsync(2) a file or a directory (the core's; loaded on first use)
local function synced(path)
  local ok, why = require("lbatch.core").fsync(path)
  if ok then return true end
  return nil, (tostring(why):gsub("^fsync [^:]*: ", ""))
end

-- a failed write: the journal is broken, the error kept
local function broken(j, err)
  j.broken = err
  return nil, err
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
  if self.broken then return nil, self.broken end
  local tmp = self.path .. ".tmp"
  local f, msg = io.open(tmp, "wb")
  if not f then return nil, errors.io("cannot write", tmp, msg) end
  local ok, werr = f:write(lines(records))
  local closed, cerr = f:close()
  if ok and closed and self.durable then ok, werr = synced(tmp) end
  if not ok or not closed then
    os.remove(tmp)
    return nil, errors.io("cannot write", tmp, werr or cerr)
  end
  local renamed, rerr = os.rename(tmp, self.path)
  if not renamed then
    os.remove(tmp)
    return nil, errors.io("cannot rename " .. tmp .. " to", self.path, rerr)
  end
  if self.durable then
    local d = self.path:match("^(.*)/[^/]*$")
    local dok, derr = synced(d == nil and "." or d == "" and "/" or d)
    if not dok then return broken(self, errors.io("cannot sync", self.path, derr)) end
  end
  self.log:close()
  local log
  log, msg = io.open(self.path, "ab")
  if not log then return broken(self, errors.io("cannot write", self.path, msg)) end
  self.log, self.appended, self.torn = log, 0, false
  return true
end

--- Append records in one write, flushed. `appended` counts the records
-- since the last compaction.
-- @tparam table ... records
-- @treturn true, or nil and an `io` error (the journal is then broken)
function Journal:append(...)
  if self.broken then return nil, self.broken end
  self.appended = self.appended + select("#", ...)
  local text = lines({ ... })
  if self.torn then text = "\n" .. text end
  local ok, msg = self.log:write(text)
  if ok then ok, msg = self.log:flush() end
  if not ok then return broken(self, errors.io("cannot write", self.path, msg)) end
  self.torn = false
  return true
end

--- What was appended, on the disk (fsync) before it returns: for a record
-- that must survive a crash of the machine.
-- @treturn true, or nil and an `io` error (the journal is then broken)
function Journal:sync()
  if self.broken then return nil, self.broken end
  local ok, why = synced(self.path)
  if not ok then return broken(self, errors.io("cannot sync", self.path, why)) end
  return true
end

-- LuaJIT compiles file:write and file:flush into a call and a guard on its
-- result; when the guard fails (the disk full) the trace exits to before
-- the call, and the interpreter calls it again, on a buffer the C library
-- has already dropped: a flush that failed is reported as done (a write,
-- done twice). The journal's writes therefore stay interpreted.
local jit = rawget(_G, "jit")
if jit then
  jit.off(Journal.append)
  jit.off(Journal.compact)
end

--- Close the journal.
function Journal:close()
  if self.log then self.log:close() self.log = nil end
end

return M
