-- multipart/form-data, read from the request body file nginx spooled to
-- disk, in blocks: a file part is copied to `dest` as it is read, so an
-- upload of any size never sits in Lua memory.
local M = {}

local BLOCK = 1024 * 1024
local MAX_FIELD = 64 * 1024

function M.boundary(content_type)
  if type(content_type) ~= "string" then return nil end
  if not content_type:lower():find("^%s*multipart/form%-data") then return nil end
  local b = content_type:match('[Bb]oundary="([^"]+)"') or content_type:match("[Bb]oundary=([^;%s]+)")
  if b and #b <= 200 then return b end
end

local function parse_headers(block)
  local h = {}
  for line in block:gmatch("[^\r\n]+") do
    local k, v = line:match("^([^:]+):%s*(.-)%s*$")
    if k then h[k:lower()] = v end
  end
  local cd = h["content-disposition"] or ""
  return {
    name = cd:match('[; ]name="([^"]*)"'),
    filename = cd:match('filename="([^"]*)"'),
    type = h["content-type"],
  }
end

-- Parse `path` (the raw body). The file part (name "file") is written to
-- `dest`. Returns { fields = {name = value}, file = {filename, bytes, type} }
-- or nil, message. `limit` caps the file part's size (then nil, "too_large").
function M.parse(path, boundary, dest, limit)
  local src = io.open(path, "rb")
  if not src then return nil, "request body is missing" end
  local dash = "--" .. boundary
  local delim = "\r\n" .. dash
  local buf = src:read(BLOCK) or ""
  local eof = false
  local function more()
    if eof then return false end
    local chunk = src:read(BLOCK)
    if not chunk then eof = true return false end
    buf = buf .. chunk
    return true
  end
  -- preamble up to the first boundary
  local s, e
  repeat
    s, e = buf:find(dash, 1, true)
  until s or not more()
  if not s then src:close() return nil, "no multipart boundary found in body" end
  buf = buf:sub(e + 1)
  local result = { fields = {} }
  local out
  while true do
    -- after a boundary: "--" ends the body, else CRLF then headers
    while #buf < 2 and more() do end
    if buf:sub(1, 2) == "--" then break end
    local he
    repeat
      s, he = buf:find("\r\n\r\n", 1, true)
    until s or #buf > 16384 or not more()
    if not s then src:close() return nil, "malformed part headers" end
    local part = parse_headers(buf:sub(1, s - 1))
    buf = buf:sub(he + 1)
    if not part.name then src:close() return nil, "part without a name" end
    local is_file = part.name == "file"
    local acc, size = {}, 0
    if is_file then
      if result.file then src:close() return nil, "more than one file part" end
      out = assert(io.open(dest, "wb"))
    end
    -- body of the part, up to the next delimiter
    while true do
      s = buf:find(delim, 1, true)
      local take = s and s - 1 or #buf - #delim
      if take > 0 then
        local data = buf:sub(1, take)
        size = size + take
        if is_file then
          if limit and size > limit then out:close() src:close() return nil, "too_large" end
          out:write(data)
        else
          if size > MAX_FIELD then src:close() return nil, "form field too large" end
          acc[#acc + 1] = data
        end
        buf = buf:sub(take + 1)
      end
      if s then
        buf = buf:sub(#delim + 1)
        break
      end
      if not more() then
        if out then out:close() end
        src:close()
        return nil, "body ends inside a part (closing boundary missing)"
      end
    end
    if is_file then
      out:close()
      out = nil
      result.file = { filename = part.filename or "file", bytes = size, type = part.type }
    else
      result.fields[part.name] = table.concat(acc)
    end
  end
  src:close()
  return result
end

return M
