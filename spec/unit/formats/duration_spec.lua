-- size.duration: the one duration formatter, in the three styles the
-- command's progress line (clock), `lbatch files` (coarse) and top (units) show.
local size = require "lbatch.impl.formats.size"

describe("size.duration", function()
  local cases = {
    { 0, "0s", "00:00", "0m" },
    { 45.9, "45s", "00:45", "0m" },
    { 185, "3m05s", "03:05", "3m" },
    { 3599, "59m59s", "59:59", "59m" },
    { 7620, "2h07m", "2:07:00", "2h" },
    { 86400 + 3 * 3600 + 59, "1d03h", "27:00:59", "1d" },
    { 3 * 86400, "3d00h", "72:00:00", "3d" },
    { -5, "0s", "00:00", "0m" },
  }

  it("writes seconds in units, as a clock, or by their largest unit", function()
    for _, c in ipairs(cases) do
      assert.are.equal(c[2], size.duration(c[1]), c[1])
      assert.are.equal(c[2], size.duration(c[1], "units"), c[1])
      assert.are.equal(c[3], size.duration(c[1], "clock"), c[1])
      assert.are.equal(c[4], size.duration(c[1], "coarse"), c[1])
    end
  end)

  it("writes - for what is not a finite number", function()
    for _, v in ipairs({ false, 0 / 0, math.huge }) do
      for _, style in ipairs({ "units", "clock", "coarse" }) do
        assert.are.equal("-", size.duration(v or nil, style))
      end
    end
  end)

  it("is the only formatter: the command and top keep none of their own", function()
    local root = os.getenv("LBATCH_ROOT") or "."
    for _, file in ipairs({ "cmd/cli.lua", "cmd/top.lua" }) do
      local f = assert(io.open(root .. "/lbatch/" .. file, "rb"))
      local src = f:read("*a")
      f:close()
      assert.is_nil(src:find("%02d:%02d", 1, true), file)
      assert.is_nil(src:find("%dd", 1, true), file)
      assert.is_nil(src:find("%dm%02ds", 1, true), file)
    end
  end)
end)
