-- State of the emulated service: files and batches in memory, every change
-- appended to DATA/journal.jsonl (lbatch.journal), file contents in
-- DATA/blobs/. At start the journal is replayed and compacted, so a
-- restart loses nothing accepted.
local journal = require "lbatch.impl.orchestration.journal"

local S = {
  files = {}, file_order = {},     -- id -> file; ids in creation order
  batches = {}, batch_order = {},  -- id -> batch; ids in creation order
  batch_pos = {},                  -- id -> index in batch_order
  offset = 0,                      -- clock offset from /_emulator/clock
}

local dir, log

local function append(rec) assert(log:append(rec)) end

function S.blob(id) return dir .. "/blobs/" .. id end

local function add_file(f)
  if not S.files[f.id] then S.file_order[#S.file_order + 1] = f.id end
  S.files[f.id] = f
end

local function add_batch(b)
  if not S.batches[b.id] then
    S.batch_order[#S.batch_order + 1] = b.id
    S.batch_pos[b.id] = #S.batch_order
  end
  S.batches[b.id] = b
end

local function replay(rec)
  if rec.file then add_file(rec.file)
  elseif rec.batch then add_batch(rec.batch)
  elseif rec.delete then S.files[rec.delete] = nil
  elseif rec.offset then S.offset = rec.offset end
end

function S.open(data_dir)
  dir = data_dir                   -- emulator/run made DATA/blobs
  log = assert(journal.open(dir .. "/journal.jsonl", replay))
  -- compact: live records only
  local order, recs = {}, {}
  for _, id in ipairs(S.file_order) do
    if S.files[id] then order[#order + 1] = id end
  end
  S.file_order = order
  if S.offset ~= 0 then recs[#recs + 1] = { offset = S.offset } end
  for _, id in ipairs(S.file_order) do recs[#recs + 1] = { file = S.files[id] } end
  for _, id in ipairs(S.batch_order) do recs[#recs + 1] = { batch = S.batches[id] } end
  assert(log:compact(recs))
end

function S.put_file(f) add_file(f); append({ file = f }) end
function S.put_batch(b) add_batch(b); append({ batch = b }) end
function S.set_offset(o) S.offset = o; append({ offset = o }) end

function S.delete_file(id)
  S.files[id] = nil
  for i, fid in ipairs(S.file_order) do
    if fid == id then table.remove(S.file_order, i) break end
  end
  os.remove(S.blob(id))
  append({ delete = id })
end

function S.now() return ngx.now() + S.offset end

return S
