--- Sizes: a file's, and a byte count and a duration as people read them.
-- @module lbatch.impl.formats.size
local M = {}

--- The size of a file in bytes.
-- @tparam string path
-- @treturn ?integer the size, or nil when the file cannot be opened
function M.file(path)
  local fh = io.open(path, "rb")
  if not fh then return nil end
  local n = fh:seek("end")
  fh:close()
  return n
end

--- A byte count for people: `512 B`, `1.5 kB`, `12.0 MB`, `3.4 GB` (powers of 1000).
-- @tparam number n bytes
-- @treturn string
function M.human(n)
  if n >= 1e9 then return ("%.1f GB"):format(n / 1e9) end
  if n >= 1e6 then return ("%.1f MB"):format(n / 1e6) end
  if n >= 1e3 then return ("%.1f kB"):format(n / 1e3) end
  return ("%d B"):format(math.floor(n))
end

--- A duration for people, in one of three styles: `"units"` (the default:
-- `45s`, `3m05s`, `2h07m`, `1d03h`), `"clock"` (`03:05`, `2:07:00`) or
-- `"coarse"` (its largest unit alone: `3m`, `2h`, `1d`). `-` for what is not
-- a finite number.
-- @tparam ?number s seconds
-- @tparam[opt] string style
-- @treturn string
function M.duration(s, style)
  if type(s) ~= "number" or s ~= s or s == math.huge then return "-" end
  local fl = math.floor
  s = math.max(0, fl(s))
  if style == "clock" then
    if s >= 3600 then return ("%d:%02d:%02d"):format(fl(s / 3600), fl(s / 60) % 60, s % 60) end
    return ("%02d:%02d"):format(fl(s / 60), s % 60)
  elseif style == "coarse" then
    if s >= 86400 then return ("%dd"):format(fl(s / 86400)) end
    if s >= 3600 then return ("%dh"):format(fl(s / 3600)) end
    return ("%dm"):format(fl(s / 60))
  end
  if s >= 86400 then return ("%dd%02dh"):format(fl(s / 86400), fl(s / 3600) % 24) end
  if s >= 3600 then return ("%dh%02dm"):format(fl(s / 3600), fl(s / 60) % 60) end
  if s >= 60 then return ("%dm%02ds"):format(fl(s / 60), s % 60) end
  return s .. "s"
end

return M
