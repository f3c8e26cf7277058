-- lbatch.media: MIME types, base64 and data: URLs, on temp files; jsonl keeps its aliases.
local H = require "helper"
local media = require "lbatch.impl.formats.media"
local jsonl = require "lbatch.jsonl"

local function write(bytes)
  local path = os.tmpname()
  local fh = assert(io.open(path, "wb"))
  fh:write(bytes)
  fh:close()
  return path
end

describe("lbatch.impl.formats.media", function()
  it("knows a MIME type by the first bytes, else the extension", function()
    assert.are.equal("image/png", media.mime_type("x.bin", "\137PNG\r\n\26\n...."))
    assert.are.equal("image/jpeg", media.mime_type("x", "\255\216\255\224"))
    assert.are.equal("image/webp", media.mime_type("x", "RIFF\0\0\0\0WEBPVP8 "))
    assert.are.equal("image/gif", media.mime_type("a.GIF"))
    assert.are.equal("application/octet-stream", media.mime_type("a.unknown"))
  end)

  it("encodes base64 with padding", function()
    assert.are.same({ "", "Zg==", "Zm8=", "Zm9v", "YW55IGNhcm5hbCBwbGVhc3U=" },
      { media.base64(""), media.base64("f"), media.base64("fo"), media.base64("foo"), media.base64("any carnal pleasu") })
    assert.are.equal("AP8=", media.base64("\0\255"))
  end)

  it("makes a local file a data: URL and leaves URLs as they are", function()
    local png = write("\137PNG\r\n\26\nabc")
    assert.are.equal("data:image/png;base64," .. media.base64("\137PNG\r\n\26\nabc"), media.data_url(png))
    assert.are.same({ type = "image_url", image_url = { url = media.data_url(png) } }, media.image(png))
    os.remove(png)
    for _, u in ipairs({ "https://example.com/a.png", "http://x/y", "oss://b/k", "data:image/png;base64,AA==" }) do
      assert.are.equal(u, media.data_url(u))
    end
  end)

  it("closes each file it reads, without waiting for the collector", function()
    local png = write("\137PNG\r\n\26\nabc")
    local left = H.files_left_open(function()
      for _ = 1, 50 do assert(media.data_url(png)) end
    end)
    os.remove(png)
    assert.is_true(left < 5, left .. " more files open after 50 reads")
  end)

  it("returns an io error for a missing file, and raises for a wrong argument", function()
    local url, err = media.data_url("/nonexistent/lbatch/a.png")
    assert.is_nil(url)
    assert.are.equal("io", err.kind)
    local part, perr = media.image("/nonexistent/lbatch/a.png")
    assert.is_nil(part)
    assert.are.equal("io", perr.kind)
    assert.has_error(function() media.data_url(42) end)
  end)

  it("is what jsonl's helpers are", function()
    assert.are.same({ media.data_url, media.image, media.mime_type, media.base64 },
      { jsonl.data_url, jsonl.image, jsonl.mime_type, jsonl.base64 })
  end)
end)
