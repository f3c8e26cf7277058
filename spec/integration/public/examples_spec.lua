-- Every example runs as its header comment says, from this checkout, with
-- an empty environment: the command line is read from the example itself,
-- so the two cannot drift. (Under LuaJIT the same line runs with luajit.)
local H = require "helper"

local function header_command(path)
  for line in io.lines(path) do
    local cmd = line:match("^%-%-%s+(emulator/around%s.-)%s*$")
    if cmd then
      cmd = cmd:gsub("%s+%-%-.*$", ""):gsub("%s*%[.*$", "")   -- the trailing comment, optional args
      return cmd
    end
    if not line:find("^%-%-") then break end
  end
end

-- what each example prints when it worked
local EXPECT = {
  ["quickstart.lua"] = { "This is a test result%.", "q7%s+emulated_failure" },
  ["evaluate.lua"] = { "6 answered, 1 failed, 0 missing", "answers.csv" },
  ["game_loop.lua"] = { "60 of 60 lines answered" },
  ["luv.lua"] = { "0 batch%(es%) on http://127%.0%.0%.1" },
  ["cqueues.lua"] = { "0 batch%(es%) on http://127%.0%.0%.1", "5 ticks of other work" },
  ["judge.lua"] = { "7 items: 6 done, 1 failed; 19 asks in 4 rounds, 3 batches", "q7%s+failed: This request asked the emulator to fail" },
}

-- (LBATCH_POLL_INTERVAL, the user's documented setting: the waits of the
-- examples that set no interval of their own are not 3 s each)
local function run(cmd)
  if H.lua == "luajit" then cmd = cmd:gsub("lua5%.4", "luajit") end
  local env = ("env -i PATH=%s HOME=%s EMULATOR_ARGS='--speed 400 --rate-limits off' LBATCH_POLL_INTERVAL=0.05"):format(
    os.getenv("PATH"), os.getenv("HOME") or "/tmp")
  return H.sh(("cd %s && %s %s 2>&1; echo \"exit=$?\""):format(H.root, env, cmd))
end

describe("the examples", function()
  local names = {}
  for name in H.sh("ls " .. H.root .. "/examples"):gmatch("[^\n]+%.lua") do names[#names + 1] = name end

  it("each has a header command, and one that this spec knows what to expect of", function()
    assert.is_true(#names >= 5)
    for _, name in ipairs(names) do
      assert.is_string(header_command(H.root .. "/examples/" .. name), name)
      assert.is_table(EXPECT[name], name)
    end
  end)

  for _, name in ipairs(names) do
    it("runs " .. name .. " as its header says", function()
      local cmd = header_command(H.root .. "/examples/" .. name)
      local out = run(cmd)
      assert.matches("exit=0", out, 1, true)
      for _, want in ipairs(EXPECT[name]) do assert.matches(want, out) end
      if name == "luv.lua" or name == "cqueues.lua" then
        local wakeups = tonumber(out:match("woken (%d+) times"))
        assert.is_true(wakeups and wakeups < 50, out)     -- woken by I/O and timers, not spinning
      end
    end)
  end
end)
