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
-- line, which the next open skips). A compaction reaches the disk (the new
-- file synced before it is renamed, then its directory) before it returns.
-- @module lbatch.impl.orchestration.journal
local cjson = require "cjson"
local errors = require "lbatch.impl.transport.errors"

local M = {}

local Journal = {}
Journal.__index = Journal

-- each record of an open journal to replay (a torn or foreign line skipped)
local function replay_lines(fh, replay)
  for line in fh:lines() do
    local ok, rec = pcall(cjson.decode, line)
    if ok and type(rec) == "table" then replay(rec) end
  end
end

--- Replay a journal and open it for appending.
-- @tparam string path the journal (created when missing)
-- @tparam ?function replay called with each record, in order
-- @tparam ?table opts durable (kept for callers: every compaction is synced)
-- @treturn table the journal, or nil and an `io` error
function M.open(path, replay, opts)
  local fh = io.open(path, "rb")
  local torn = false
  if fh then
    if replay then replay_lines(fh, replay) end
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

-- (pause: called every 4 records, see Journal:compact)
local function lines(records, pause)
  local t = {}
  for i, rec in ipairs(records) do
    t[i] = cjson.encode(rec)
    if pause and i % 4 == 0 then pause() end
  end
  t[#t + 1] = ""
  return table.concat(t, "\n")
end

-- Not an API: the kill -9 spec of a compaction (spec/unit/orchestration/journal_kill_spec)
-- sets this variable to "N" to have the process SIGKILL itself at the N-th
-- point of `replace` and `compact` (1 the temp file opened, 2 written, 3
-- closed, 4 synced, 5 renamed, 6 the directory synced, 7 the journal
-- reopened). Read once, at load.
local KILL_AT = tonumber(os.getenv("LBATCH_SPEC_ONLY_KILL_REPLACE_AT") or "")
local function point(n)
  if n == KILL_AT then io.stdout:flush() os.execute("kill -9 $PPID") end
end

--- A file replaced whole or not at all, durably: `fill(fh)` writes a temp
-- file beside `path` (`tmp`, default `path .. ".tmp"`) and returns a value,
-- or nil and an error (or raises); the temp file is then closed, synced and
-- renamed over `path`, and the directory synced. On a failure before the
-- rename the temp file is removed and `path` left as it was. The one atomic
-- replace of every file of state (journals, flow.json, run.json, results).
-- @tparam string path
-- @tparam function fill
-- @tparam[opt] string tmp
-- @tparam[opt] function pause called once the temp file is synced, before
-- the rename (`client:pause`, in a task: each sync is a host's step apiece;
-- `path` is still the old file then)
-- @return what `fill` returned, or nil, an `io` error and true when `path`
-- was replaced but its directory could not be synced
function M.replace(path, fill, tmp, pause)
  local dir = path:match("^(.*)/[^/]*$") or "."
  if dir == "" then dir = "/" end
  tmp = tmp or path .. ".tmp"
  local fh, msg = io.open(tmp, "wb")
  if not fh then
    if msg and msg:sub(1, #tmp + 2) == tmp .. ": " then msg = msg:sub(#tmp + 3) end   -- the reason, not the temp name
    return nil, errors.io("cannot write", path, msg)
  end
  fh:setvbuf("full", 1024 * 1024)
  point(1)
  local ok, a, b = pcall(fill, fh)
  point(2)
  local closed, cerr = fh:close()
  point(3)
  if not ok then os.remove(tmp) error(a, 0) end
  local err = (a == nil and (b or errors.io("cannot write", path)))
    or (not closed and errors.io("cannot write", path, cerr))
  if not err then
    if pause then pause() end            -- (the file closed: its sync in a step of its own)
    local done, why = synced(tmp)
    err = not done and errors.io("cannot sync", tmp, why)
    point(4)
    if pause and not err then pause() end
  end
  if not err then
    local renamed, why = os.rename(tmp, path)
    err = not renamed and errors.io("cannot rename " .. tmp .. " to", path, why)
    point(5)
  end
  if err then os.remove(tmp) return nil, err end
  local done, why = synced(dir)
  point(6)
  if not done then return nil, errors.io("cannot sync", dir, why), true end
  return a, b
end

--- Replace the journal with `records` (`journal.replace`: written aside,
-- synced, renamed over, its directory synced).
-- @tparam {table,...} records the live state
-- @tparam[opt] function pause called every 4 records while they are
-- encoded, before the file is touched, and once the new file is synced
-- (`client:pause`, in a task: a host's step then ends in the middle of a
-- big state's encoding, or between the two syncs; see `replace`)
-- @treturn true, or nil and an `io` error
function Journal:compact(records, pause)
  if self.broken then return nil, self.broken end
  local text = lines(records, pause)
  local ok, err, replaced = M.replace(self.path, function(fh)
    local w, werr = fh:write(text)
    if not w then return nil, errors.io("cannot write", self.path, werr) end
    return true
  end, nil, pause)
  if replaced then return broken(self, err) end
  if not ok then return nil, err end
  local msg
  self.log:close()
  local log
  log, msg = io.open(self.path, "ab")
  if not log then return broken(self, errors.io("cannot write", self.path, msg)) end
  self.log, self.appended, self.torn = log, 0, false
  point(7)
  return true
end

--- Append records in one write, flushed. `appended` counts the records
-- since the last compaction.
-- @tparam table ... records
-- @treturn true, or nil and an `io` error (the journal is then broken)
function Journal:append(...)
  return self:append_list({ ... })
end

--- Append a list of records in one write, flushed (`append`, for a list
-- of any length: no unpack of it, which LuaJIT cannot compile).
-- @tparam {table,...} records
-- @treturn true, or nil and an `io` error (the journal is then broken)
function Journal:append_list(records)
  if self.broken then return nil, self.broken end
  self.appended = self.appended + #records
  local text = lines(records)
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
  jit.off(Journal.append_list)
  jit.off(Journal.compact)
end

--- Close the journal.
function Journal:close()
  if self.log then self.log:close() self.log = nil end
end

-- ------------------------------------------------------------ a pipeline's records

--- The format of a pipeline's journal: its header's `format` and `version`.
-- Version 2 (`{format = "lbatch-pipeline", version = 2, run, phase, ...}`,
-- a shard's record `{index, shard}`) is written; version 1 (`{version =
-- 1, run, ...}`, `{k, shard}`) is still read.
M.PIPELINE_FORMAT, M.PIPELINE_VERSION = "lbatch-pipeline", 2

--- A shard's record in a pipeline's journal: its new state.
-- @tparam number index the shard's number
-- @tparam table shard
-- @treturn table
function M.shard_record(index, shard) return { index = index, shard = shard } end

--- A pipeline's journal holds a header record (the run, its phase, what
-- it was asked: see `PIPELINE_FORMAT`), then a record per change: a
-- shard's new state (`shard_record`) or the run's phase (`{phase}`). The
-- one reader of those records: a replay for `journal.open`, and a function
-- that returns the state so far (`{shards = {[index] = shard}, ...}` with
-- the header's fields, format and version made this version's; nil before
-- a header; nil and an `invalid` error, code `journal_newer`, after the
-- header of a newer version than this one).
-- @tparam[opt] string path the journal's, for that error
-- @treturn function replay
-- @treturn function state
function M.pipeline_replay(path)
  local state, newer
  local function replay(rec)
    if rec.format == M.PIPELINE_FORMAT and not (tonumber(rec.version) and rec.version <= M.PIPELINE_VERSION) then
      state, newer = nil, rec.version
    elseif rec.format == M.PIPELINE_FORMAT or (rec.format == nil and rec.version == 1) then
      newer = nil
      state = {}
      for k, v in pairs(rec) do state[k] = v end
      state.format, state.version, state.shards = M.PIPELINE_FORMAT, M.PIPELINE_VERSION, {}
    elseif state and type(rec.shard) == "table" and (rec.index or rec.k) then
      state.shards[rec.index or rec.k] = rec.shard
    elseif state and rec.phase then state.phase = rec.phase end
  end
  return replay, function()
    if newer == nil then return state end
    local v = tonumber(newer)
    v = v and v == math.floor(v) and ("%d"):format(v) or tostring(newer)     -- 3, not 3.0 (cjson, Lua 5.3+)
    return nil, errors.new({ kind = "invalid", code = "journal_newer", path = path, message = ("%s is %s version "
      .. "%s; this lbatch reads versions 1 to %d: run it with the lbatch that wrote it"):format(path or "the journal",
      M.PIPELINE_FORMAT, v, M.PIPELINE_VERSION) })
  end
end

--- The records of a pipeline's whole state (a compaction's): its header
-- (this version's format), then a record per shard.
-- @tparam table state as `pipeline_replay` makes it
-- @treturn {table,...}
function M.pipeline_records(state)
  local head = {}
  for k, v in pairs(state) do if k ~= "shards" then head[k] = v end end
  head.format, head.version = M.PIPELINE_FORMAT, M.PIPELINE_VERSION
  local recs = { head }
  for k, sh in ipairs(state.shards) do recs[#recs + 1] = M.shard_record(k, sh) end
  return recs
end

--- A pipeline's journal read, not opened for writing (`lbatch report`, `lbatch top`).
-- @tparam string path
-- @treturn ?table the state (as `pipeline_replay`'s; nil when it has no header yet), or nil and an `io` error
-- (or `journal_newer`'s)
function M.read_pipeline(path)
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  local replay, state = M.pipeline_replay(path)
  replay_lines(fh, replay)
  fh:close()
  local st, err = state()
  if err then return nil, err end
  return st or { shards = {} }
end

return M
