-- lbatch.size: a file's size and a byte count for people.
local size = require "lbatch.impl.formats.size"

describe("lbatch.impl.formats.size", function()
  it("gives a file's size, and nil for a file that is not there", function()
    local path = os.tmpname()
    local fh = assert(io.open(path, "wb"))
    fh:write(("x"):rep(1234))
    fh:close()
    assert.are.equal(1234, size.file(path))
    os.remove(path)
    assert.is_nil(size.file(path))
  end)

  it("leaves no file open: a long-lived host asks for sizes all day", function()
    local stat = assert(io.open("/proc/self/stat"))
    local pid = stat:read("*n")
    stat:close()
    -- counted in this process (LuaFileSystem): through `ls` in a popen, the
    -- pipe's other end may still be open here while ls reads the list, and
    -- a count was one more before than after (a run on Lua 5.3)
    local ok_lfs, lfs = pcall(require, "lfs")
    local function open_fds()
      local n = 0
      if ok_lfs then
        for name in lfs.dir("/proc/" .. pid .. "/fd") do if name:match("^%d+$") then n = n + 1 end end
        return n
      end
      local p = assert(io.popen("ls /proc/" .. pid .. "/fd"))
      for _ in p:lines() do n = n + 1 end
      p:close()
      return n
    end
    local path = os.tmpname()
    collectgarbage("stop")                          -- no collector to close what was left open
    local before = open_fds()
    for _ = 1, 20 do assert.are.equal(0, size.file(path)) end
    local after = open_fds()
    collectgarbage("restart")
    os.remove(path)
    assert.are.equal(before, after)
  end)

  it("writes bytes in powers of 1000", function()
    assert.are.same({ "0 B", "999 B", "1.0 kB", "1.5 kB", "12.0 MB", "3.4 GB" },
      { size.human(0), size.human(999.5), size.human(1000), size.human(1500), size.human(12e6), size.human(3.4e9) })
  end)
end)
