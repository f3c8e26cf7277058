-- lbatch.size: a file's size and a byte count for people.
local size = require "lbatch.size"

describe("lbatch.size", function()
  it("gives a file's size, and nil for a file that is not there", function()
    local path = os.tmpname()
    local fh = assert(io.open(path, "wb"))
    fh:write(("x"):rep(1234))
    fh:close()
    assert.are.equal(1234, size.file(path))
    os.remove(path)
    assert.is_nil(size.file(path))
  end)

  it("writes bytes in powers of 1000", function()
    assert.are.same({ "0 B", "999 B", "1.0 kB", "1.5 kB", "12.0 MB", "3.4 GB" },
      { size.human(0), size.human(999.5), size.human(1000), size.human(1500), size.human(12e6), size.human(3.4e9) })
  end)
end)
