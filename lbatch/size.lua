--- Sizes: a file's, and a byte count as people read it.
-- @module lbatch.size
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

return M
