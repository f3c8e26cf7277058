-- A new user's first hour, as the README and the examples lead it: no
-- LBATCH_POLL_INTERVAL, the commands as written, the examples run twice at
-- once, `make install` on Debian. Each case is something that went wrong
-- for one (issue 32).
local H = require "helper"

-- the checkout's modules and the core built for this spec's Lua
local function luapaths()
  local cdir = H.lua:find("luajit") and "jit" or "5.4"
  return ("LUA_PATH='%s/?.lua;%s/?/init.lua;;' LUA_CPATH='%s/build/%s/?.so;;'"):format(H.root, H.root, H.root, cdir)
end

-- the README's first ```lua block
local function first_snippet()
  local text = assert(H.read(H.root .. "/README.md"))
  return assert(text:match("\n```lua\n(.-)\n```\n"))
end

describe("a new user", function()
  local emu
  setup(function() emu = H.emulator({ speed = 400, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  -- cmd in `cwd` with a clean environment (no LBATCH_POLL_INTERVAL; `env`: more VAR=VALUE words): output
  -- (both streams), exit code, seconds
  local function run(cwd, cmd, env)
    local t = H.now()
    local out = H.sh(("cd %s && env -i PATH=%s HOME=%s DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s %s 2>&1; echo \"exit=$?\"")
      :format(H.q(cwd), os.getenv("PATH"), cwd, emu.base, luapaths(), env or "", cmd))
    return out, tonumber(out:match("exit=(%d+)%s*$")), H.now() - t
  end

  it("runs a CSV with an empty row: refused before anything is sent, and no work directory left", function()
    local dir = H.tmpdir()
    H.write(dir .. "/q.csv", "id,question\nc1,What is 2 + 2?\nc2,\n")
    local function uploads() local r = emu.stats().routes return type(r) == "table" and r["POST /files"] or 0 end
    local before = uploads()
    local out, code = run(dir, ("%s %s/bin/lbatch run q.csv --model qwen-plus"):format(H.lua, H.root))
    assert.are.equal(1, code, out)
    assert.matches("csv_no_content", out, 1, true)
    assert.is_false(H.exists(dir .. "/q.csv.lbatch"), out)
    assert.are.equal(before, uploads())
    -- a directory the user named and made is theirs: left as it was
    H.sh("mkdir " .. H.q(dir .. "/mine"))
    out, code = run(dir, ("%s %s/bin/lbatch run q.csv --model qwen-plus --dir mine"):format(H.lua, H.root))
    assert.are.equal(1, code, out)
    assert.truthy(H.exists(dir .. "/mine"))
  end)

  it("runs the README's first snippet and its wait sees the end within seconds, not a minute", function()
    local dir = H.tmpdir()
    H.requests(dir .. "/requests.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus" })
    H.write(dir .. "/first.lua", first_snippet())
    -- the wait's default interval is a minute: the first poll after the one at once comes in seconds
    local out, code, took = run(dir, "timeout 45 " .. H.lua .. " first.lua")
    assert.are.equal(0, code, out)
    -- (a first pause of the interval's minute cannot pass; a slow machine's seconds can)
    assert.is_true(took < 40, ("the snippet took %.1f s"):format(took))
    assert.truthy(H.exists(dir .. "/out.jsonl"))
  end)

  it("runs the README's `lbatch flow judge.lua --items questions.csv` with examples/judge.lua, as written", function()
    local dir = H.tmpdir()
    assert(H.ok(("cp %s/examples/judge.lua %s/examples/questions.csv %s/"):format(H.q(H.root), H.q(H.root), H.q(dir))))
    -- the command as written; the user's documented LBATCH_POLL_INTERVAL (20 ms), so that its 4 rounds do
    -- not wait out the default schedule's 3 s each (the case above holds that schedule, with no variable)
    local fast = "LBATCH_POLL_INTERVAL=0.02"
    local out, code = run(dir, ("%s %s/bin/lbatch flow judge.lua --items questions.csv"):format(H.lua, H.root), fast)
    assert.are.equal(0, code, out)
    assert.matches("questions.csv.flow/results.jsonl: 7 items, 6 done, 1 failed; 19 asks in 4 rounds", out, 1, true)
    -- and the same file still runs as a program
    out, code = run(dir, ("%s judge.lua questions.csv work"):format(H.lua))
    assert.are.equal(0, code, out)
    assert.matches("7 items: 6 done, 1 failed; 19 asks in 4 rounds, 3 batches, %d+ tokens %-> work", out)
  end)

  it("runs two examples at once: each writes to paths of its own", function()
    local dir = H.tmpdir()
    local cmd = ("(%s %s/examples/quickstart.lua > a.txt 2>&1; echo $? >> a.txt) &"
      .. " (%s %s/examples/quickstart.lua > b.txt 2>&1; echo $? >> b.txt) &"
      .. " %s %s/examples/evaluate.lua %s/examples/questions.csv > c.txt 2>&1 &"
      .. " %s %s/examples/evaluate.lua %s/examples/questions.csv > d.txt 2>&1; wait")
      :format(H.lua, H.root, H.lua, H.root, H.lua, H.root, H.root, H.lua, H.root, H.root)
    local out, code = run(dir, "sh -c " .. H.q(cmd))
    assert.are.equal(0, code, out)
    local a, b = H.read(dir .. "/a.txt"), H.read(dir .. "/b.txt")
    assert.matches("0\n$", a) assert.matches("0\n$", b)
    local pa, pb = a:match("output%s+(%S+)"), b:match("output%s+(%S+)")
    assert.is_string(pa, a) assert.is_string(pb, b)
    assert.are_not.equal(pa, pb)
    local c, d = H.read(dir .. "/c.txt"), H.read(dir .. "/d.txt")
    local oc, od = c:match("6 answered, 1 failed, 0 missing, %d+ tokens %-> (%S+)"), d:match("%-> (%S+)")
    assert.is_string(oc, c) assert.is_string(od, d)
    assert.are_not.equal(oc, od)
    os.remove(oc) os.remove(od)
  end)
end)

describe("make install", function()
  it("says where lua-cjson comes from instead of calling Debian's missing #install", function()
    if not H.ok("command -v luarocks >/dev/null 2>&1") then return pending("luarocks is not installed") end
    local tree, src = H.tmpdir(), H.scratch_checkout()   -- (luarocks make compiles in the tree)
    local out = H.sh(("make -s -C %s install PREFIX=%s 2>&1; echo \"exit=$?\""):format(H.q(src), H.q(tree)))
    assert.matches("exit=0\n$", out)
    assert.matches("lbatch [%d.%-]+ is now installed in", out)
    assert.is_nil(out:find("Missing dependencies", 1, true), out)
    assert.matches("lua-cjson: the system's, outside LuaRocks", out, 1, true)
    out = H.sh(tree .. "/bin/lbatch --version 2>&1")
    assert.matches("^lbatch %d+%.%d+%.%d+\n$", out)
    H.ok("rm -rf " .. H.q(tree) .. " " .. H.q(src))
  end)
end)
