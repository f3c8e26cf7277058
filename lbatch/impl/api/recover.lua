--- After a call whose outcome is unknown: what it may have made.
--
-- An upload or a create that lost its answer (a reset, a timeout) may or
-- may not have happened. Sending it again could store a second file or
-- start a second batch (and pay twice), so first look among the newest:
-- the client does it before a retry, the pipeline after a crash. Each
-- function takes `list(query) -> page | nil, err`, the one call it needs.
--
-- A step is recognised by the stamps it carries (a file's name and size,
-- a batch's input file, endpoint and metadata), never by the client's
-- wall clock: a clock that runs fast or slow finds the same thing. A
-- server may make the object a while after it was asked (and even after
-- the client has gone): `within` looks again over a window before the
-- caller sends the step again.
-- @module lbatch.impl.api.recover
local M = {}

local function same_metadata(a, b)
  a, b = a or {}, b or {}
  for k, v in pairs(a) do if b[k] ~= v then return false end end
  for k, v in pairs(b) do if a[k] ~= v then return false end end
  return true
end

--- The stored file an upload made: named `want.filename` and, when given,
-- of `want.bytes` bytes and made since `want.since`, among the newest 100.
-- @tparam function list one page of files
-- @tparam table want filename, bytes, since
-- @return the file, nil when there is none, or nil and the list's error
function M.upload(list, want)
  local page, err = list({ limit = 100, order = "desc" })
  if not page then return nil, err end
  for _, f in ipairs(page.data) do
    if f.filename == want.filename and (want.bytes == nil or f.bytes == want.bytes)
      and (f.created_at or 0) >= (want.since or 0) then
      return f
    end
  end
end

--- The batch a create made from `want.input_file_id`; when given, also
-- with `want.endpoint`, exactly `want.metadata` (a table: `{}` for none)
-- and made since `want.since`, among the newest 100 (on DashScope those
-- of that input file).
-- @tparam function list one page of batches
-- @tparam table want input_file_id, endpoint, metadata, since
-- @return the batch, nil when there is none, or nil and the list's error
function M.batch(list, want)
  local page, err = list({ input_file_ids = { want.input_file_id }, limit = 100 })
  if not page then return nil, err end
  for _, b in ipairs(page.data) do
    if b.input_file_id == want.input_file_id and (want.endpoint == nil or b.endpoint == want.endpoint)
      and (want.metadata == nil or same_metadata(b.metadata, want.metadata))
      and (b.created_at or 0) >= (want.since or 0) then
      return b
    end
  end
end

--- The newest batch whose `metadata[want.key]` is `want.stamp` (or
-- `want.stamp .. "." .. anything`: the same stamp asked for again), made
-- from `want.input_file_id` when given, among the newest 100 (on DashScope
-- those of that input file).
-- @tparam function list one page of batches
-- @tparam table want key, stamp, input_file_id
-- @return the batch, nil when there is none, or nil and the list's error
function M.stamped(list, want)
  local id = want.input_file_id
  local page, err = list({ input_file_ids = id and { id } or nil, limit = 100 })
  if not page then return nil, err end
  local best
  for _, b in ipairs(page.data) do
    local v = type(b.metadata) == "table" and b.metadata[want.key]
    local ok = type(v) == "string" and (v == want.stamp or v:sub(1, #want.stamp + 1) == want.stamp .. ".")
    if ok and (id == nil or b.input_file_id == id) and (not best or (b.created_at or 0) > (best.created_at or 0)) then
      best = b
    end
  end
  return best
end

--- Look again and again until `look` finds the object or `window`
-- seconds have passed (a server's consistency delay: an upload or a
-- create still being made when the client died shows up later).
-- @tparam function look () -> object | nil | nil, err (an error ends it)
-- @tparam number window seconds to keep looking (0: once)
-- @tparam function sleep (seconds) waits
-- @tparam function clock () -> a monotonic time in seconds
-- @tparam[opt] number every seconds between looks (default: a tenth of
-- the window, 0.05 to 2)
-- @return the object, nil when none appeared in time, or nil and the error
function M.within(look, window, sleep, clock, every)
  local t0 = clock()
  every = every or math.max(0.05, math.min(2, window / 10))
  while true do
    local v, err = look()
    if v ~= nil or err ~= nil then return v, err end
    local left = window - (clock() - t0)
    if left <= 0 then return nil end
    sleep(math.min(every, left))
  end
end

return M
