--- Multimodal helpers: a local image or video frame as a data: URL (its
-- MIME type from its first bytes), and the content part that carries it.
--
--    local part = assert(media.image("cat.png"))   -- {type = "image_url", image_url = {url = "data:image/png;..."}}
--
-- `lbatch.jsonl` has them too (`jsonl.data_url`, `jsonl.image`, ...).
-- @module lbatch.impl.formats.media
local errors = require "lbatch.impl.transport.errors"

local M = {}

local MAGIC = {
  { "^\137PNG\r\n\26\n", "image/png" }, { "^\255\216\255", "image/jpeg" }, { "^GIF8[79]a", "image/gif" },
  { "^RIFF....WEBP", "image/webp" }, { "^BM", "image/bmp" }, { "^II%*%z", "image/tiff" },
  { "^MM%z%*", "image/tiff" }, { "^....ftypheic", "image/heic" }, { "^....ftyp", "video/mp4" },
}
local EXT = {
  png = "image/png", jpg = "image/jpeg", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp",
  bmp = "image/bmp", tif = "image/tiff", tiff = "image/tiff", heic = "image/heic", mp4 = "video/mp4",
}

--- The MIME type of a file, from its first bytes or else its extension.
-- @tparam string path
-- @tparam[opt] string head its first bytes
-- @treturn string
function M.mime_type(path, head)
  for _, m in ipairs(MAGIC) do
    if head and head:find(m[1]) then return m[2] end
  end
  return EXT[(path:match("%.(%w+)$") or ""):lower()] or "application/octet-stream"
end

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64T = {}
for i = 0, 63 do B64T[i] = B64:sub(i + 1, i + 1) end

--- Base64 (RFC 4648, with padding).
-- @tparam string s bytes
-- @treturn string
local function base64(s)
  local out, n, byte, floor = {}, 0, string.byte, math.floor
  for i = 1, #s - 2, 3 do
    local a, b, c = byte(s, i, i + 2)
    local v = a * 65536 + b * 256 + c
    n = n + 1
    out[n] = B64T[floor(v / 262144)] .. B64T[floor(v / 4096) % 64] .. B64T[floor(v / 64) % 64] .. B64T[v % 64]
  end
  local rest = #s % 3
  if rest > 0 then
    local a, b = byte(s, #s - rest + 1, #s)
    local v = a * 65536 + (b or 0) * 256
    n = n + 1
    out[n] = B64T[floor(v / 262144)] .. B64T[floor(v / 4096) % 64]
      .. (rest == 2 and B64T[floor(v / 64) % 64] or "=") .. "="
  end
  return table.concat(out)
end
M.base64 = base64

--- An http(s), oss or data: URL as it is; a local file (an image or a
-- video frame) as a data: URL with its MIME type.
-- @tparam string src a path or a URL
-- @treturn string the URL, or nil and an `io` error
function M.data_url(src)
  errors.check("media.data_url", "src", src, "string")
  if src:find("^https?://") or src:find("^data:") or src:find("^oss://") then return src end
  local fh, msg = io.open(src, "rb")
  if not fh then return nil, errors.io("cannot read", src, msg) end
  local data, rerr = fh:read("*a")
  fh:close()
  if not data then return nil, errors.io("cannot read", src, rerr) end
  return "data:" .. M.mime_type(src, data:sub(1, 16)) .. ";base64," .. base64(data)
end

--- A content part `{type = "image_url", image_url = {url = ...}}`.
-- @tparam string src a path or a URL
-- @treturn table the part, or nil and an `io` error
function M.image(src)
  local url, err = M.data_url(src)
  if not url then return nil, err end
  return { type = "image_url", image_url = { url = url } }
end

return M
