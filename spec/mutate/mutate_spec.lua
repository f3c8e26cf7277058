-- spec/mutate/run itself (make mutate), on a small tree of its own: a git
-- repository with one module, its spec, spec/run-all (the whole suite's job
-- pool) and a Makefile whose build is a stub, so that each case takes
-- seconds. Starts no server.
local H = require "helper"

local RUN = H.root .. "/spec/mutate"

local MODULE = [[
local M = {}
function M.sign(x)
  if x > 0 then return 1 end
  if x < 0 then return -1 end
  return 0
end
return M
]]
-- a module no spec requires: its mutants go straight to the whole suite
local OTHER = "local M = {}\nfunction M.both(a, b)\n  return a and b\nend\nreturn M\n"

local SPEC = [[
local f = io.open(os.getenv("MUTATE_SPEC_SEEN"), "a")
f:write(("%s %s\n"):format(os.getenv("LBATCH_PORT_BASE"), os.getenv("TMPDIR")))
f:close()
local a = require "lbatch.a"
describe("a", function()
  it("signs", function()
    assert.equal(1, a.sign(5))
    assert.equal(-1, a.sign(-5))
    assert.equal(0, a.sign(0))
  end)
end)
]]

-- a git repository holding the runner, MODULE and SPEC, committed
local function tree()
  local dir = H.tmpdir()
  H.mkdir(dir .. "/spec/mutate")
  H.mkdir(dir .. "/spec/unit")
  H.mkdir(dir .. "/lbatch/core")
  H.mkdir(dir .. "/spec/tools")
  assert(H.ok(("cp %s/run %s/slots.lua %s/spec/mutate/"):format(H.q(RUN), H.q(RUN), H.q(dir))))
  assert(H.ok(("cd %s && cp spec/run-all %s/spec/ && cp spec/tools/timed.lua spec/tools/slowest %s/spec/tools/")
    :format(H.q(H.root), H.q(dir), H.q(dir))))
  H.write(dir .. "/lbatch/a.lua", MODULE)
  H.write(dir .. "/lbatch/c.lua", OTHER)
  H.write(dir .. "/spec/unit/a_spec.lua", SPEC)
  H.write(dir .. "/spec/unit/other_spec.lua", '-- require "lbatch.a"\nit("is here", function() end)\n')
  H.write(dir .. "/Makefile", "build/5.4/lbatch/core.so:\n\tmkdir -p build/5.4/lbatch && touch $@\n")
  assert(H.ok(("cd %s && git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm one")
    :format(H.q(dir))))
  return dir
end

local function run(dir, env, files)
  local seen = dir .. "/seen"
  -- not the MUTATE_ settings of a mutation run this spec may be part of
  local out = H.sh(("cd %s && env -u MUTATE_SINCE -u MUTATE_ONLY -u MUTATE_LIST -u MUTATE_MAP -u MUTATE_WHOLE " ..
    "-u MUTATE_JOBS -u MUTATE_WHOLE_JOBS -u MUTATE_FULL MUTATE_SPEC_SEEN=%s %s lua5.4 spec/mutate/run %s 2>&1; echo \"exit $?\"")
    :format(H.q(dir), H.q(seen), env, files or ""))
  return out, H.exists(seen) and H.read(seen) or ""
end

describe("make mutate SINCE", function()
  local dir
  before_each(function() dir = tree() end)
  after_each(function() os.execute("rm -rf " .. H.q(dir)) end)

  it("mutates only the lines changed since the commit, uncommitted ones included", function()
    local all = run(dir, "MUTATE_LIST=1")
    assert.matches("lbatch/a.lua:4 ", all, 1, true)       -- the whole run mutates line 4 of a.lua
    assert.matches("lbatch/c.lua:3 ", all, 1, true)       -- and c.lua
    -- a change to line 3 only (uncommitted): line 4 and c.lua are left alone
    H.write(dir .. "/lbatch/a.lua", (MODULE:gsub("if x > 0 then return 1 end", "if x > 0 then return 1 end  ")))
    local out = run(dir, "MUTATE_SINCE=HEAD MUTATE_LIST=1")
    assert.matches("lbatch/a.lua:3 ", out, 1, true)
    assert.not_matches("lbatch/a.lua:4 ", out, 1, true)
    assert.not_matches("lbatch/c.lua", out, 1, true)
    assert.matches("the lines changed since HEAD", out, 1, true)
  end)

  it("takes the commits since the ref, and an untracked module whole", function()
    H.write(dir .. "/lbatch/c.lua", (OTHER:gsub("return a and b", "return a and b or nil")))
    assert(H.ok(("cd %s && git -c user.name=t -c user.email=t@t commit -qam two"):format(H.q(dir))))
    H.write(dir .. "/lbatch/b.lua", "local M = {}\nfunction M.f(x) return x == 1 end\nreturn M\n")
    local out = run(dir, "MUTATE_SINCE=HEAD~1 MUTATE_LIST=1")
    assert.matches("lbatch/c.lua:3 ", out, 1, true)
    assert.matches("lbatch/b.lua:2 ", out, 1, true)
    assert.not_matches("lbatch/a.lua", out, 1, true)
  end)

  it("takes the internal modules, the command's and the C core's files changed since the ref, not the others", function()
    local files = {
      ["lbatch/impl/api/d.lua"] = "local M = {}\nfunction M.f(x)\n  return x > 1\nend\nreturn M\n",
      ["lbatch/cmd/e.lua"] = "local M = {}\nfunction M.g(x)\n  return x < 2\nend\nreturn M\n",
      ["lbatch/core/f.c"] = "int f(int x);\nint f(int x) {\n  return x > 3;\n}\n",
      ["lbatch/impl/formats/same.lua"] = "local M = {}\nfunction M.h(x)\n  return x >= 4\nend\nreturn M\n",
    }
    for path, text in pairs(files) do
      H.mkdir(dir .. "/" .. path:match("^(.*)/"))
      H.write(dir .. "/" .. path, text)
    end
    assert(H.ok(("cd %s && git add -A && git -c user.name=t -c user.email=t@t commit -qm two"):format(H.q(dir))))
    for path, text in pairs(files) do   -- line 3 of each changed, but same.lua's
      if not path:find("same", 1, true) then H.write(dir .. "/" .. path, (text:gsub("return x ([<>]) (%d)", "return (x %1 %2)"))) end
    end
    assert(H.ok(("cd %s && git -c user.name=t -c user.email=t@t commit -qam three"):format(H.q(dir))))
    local out = run(dir, "MUTATE_SINCE=HEAD~1 MUTATE_LIST=1")
    assert.matches("lbatch/impl/api/d.lua:3 ", out, 1, true)
    assert.matches("lbatch/cmd/e.lua:3 ", out, 1, true)
    assert.matches("lbatch/core/f.c:3 ", out, 1, true)
    assert.not_matches("same.lua", out, 1, true)
    assert.not_matches("lbatch/a.lua", out, 1, true)
    assert.matches("in 3 files", out, 1, true)
  end)

  it("with no mutable line changed, says so and exits 0", function()
    local out = run(dir, "MUTATE_SINCE=HEAD")
    assert.matches("no mutable line of lbatch/*.lua or lbatch/core/*.c changed since HEAD: nothing to run", out, 1, true)
    assert.matches("exit 0\n$", out)
    out = run(dir, "MUTATE_SINCE=nosuchref")
    assert.matches("SINCE=nosuchref is not a commit", out, 1, true)
    assert.matches("exit 2\n$", out)
  end)
end)

describe("make mutate's map and slots", function()
  local dir
  before_each(function() dir = tree() end)
  after_each(function() os.execute("rm -rf " .. H.q(dir)) end)

  it("maps a module to the specs that load it, quickest first by the times measured", function()
    H.write(dir .. "/spec/unit/zz_spec.lua", 'local a = require("lbatch.a")\nit("x", function() assert(a) end)\n')
    -- a spec that runs a driver which requires the module, one that runs the command
    H.mkdir(dir .. "/spec/fixtures")
    H.write(dir .. "/spec/fixtures/drv.lua", 'local a = require "lbatch.a"\nprint(a.sign(1))\n')
    H.write(dir .. "/spec/unit/via_spec.lua", 'local DRV = "spec/fixtures/drv.lua"\nit("x", function() assert(DRV) end)\n')
    H.mkdir(dir .. "/lbatch/cmd")
    H.write(dir .. "/lbatch/cmd/cli.lua", "local M = {}\nfunction M.main(x) return x > 1 end\nreturn M\n")
    H.write(dir .. "/spec/unit/cmd_spec.lua", 'local CMD = "bin/' .. 'lbatch"\nit("x", function() assert(CMD) end)\n')
    H.mkdir(dir .. "/build")
    H.write(dir .. "/build/mutate-times", "9.0\tspec/unit/zz_spec.lua\n0.5\tspec/unit/a_spec.lua\n" ..
      "3.0\tspec/unit/via_spec.lua\n1.0\tspec/unit/cmd_spec.lua\n")
    local out = run(dir, "MUTATE_LIST=1 MUTATE_MAP=1")
    -- the commented require of other_spec does not count
    assert.matches("%] lbatch/a%.lua:[^\n]*\n    specs, in this order: " ..
      "spec/unit/a_spec%.lua spec/unit/via_spec%.lua spec/unit/zz_spec%.lua\n", out)
    assert.matches("%] lbatch/cmd/cli%.lua:[^\n]*\n    specs, in this order: spec/unit/cmd_spec%.lua\n", out)
    assert.matches("%] lbatch/c%.lua:[^\n]*\n    specs, in this order: \n", out)
    local f = assert(io.open(dir .. "/build/mutate-times", "a"))
    f:write("0.1\tspec/unit/zz_spec.lua\n")   -- the last line of a spec counts
    f:close()
    -- a module's own spec found by its name in a layer's folder, required or not
    H.mkdir(dir .. "/spec/integration/public")
    H.write(dir .. "/spec/integration/public/c_spec.lua", 'it("x", function() end)\n')
    out = run(dir, "MUTATE_LIST=1 MUTATE_MAP=1")
    assert.matches("specs, in this order: spec/unit/zz_spec.lua spec/unit/a_spec.lua spec/unit/via_spec.lua\n", out, 1, true)
    assert.matches("%] lbatch/c%.lua:[^\n]*\n    specs, in this order: spec/integration/public/c_spec%.lua\n", out)
  end)

  it("runs the mutants two at a time, each with its ports and temp dir; the first spec that fails kills", function()
    local out, seen = run(dir, "")
    -- every mutant is named with its place, its verdict and its seconds
    for line in out:gmatch("%] lbatch/a%.lua:%d+ [^\n]*\n([^\n]*)") do
      assert.matches("^    (.-) %[[%d.]+ s%]$", line)
    end
    assert.matches("killed by spec/unit/a_spec.lua [", out, 1, true)
    -- lbatch/c.lua is required by no spec: its mutant survives the whole suite
    assert.matches("%] lbatch/c%.lua:3 andor#1 [^\n]*\n    SURVIVED the whole suite %[", out)
    assert.matches("score: %d+/%d+ killed", out)
    assert.matches("wall time: %d+ min %d+ s %(2 at a time%)", out)
    assert.matches("exit 1\n$", out)
    -- a module's specs: in the slot (its ports, its TMPDIR); the whole
    -- suite: through run-all's pool, each job with a TMPDIR and ports of its
    -- own, in the slot's blocks (20000-25999, 26000-31999)
    local bases, tmps, pool = {}, {}, 0
    for base, tmp in seen:gmatch("(%d+) (%S+)") do
      if tmp:match("^/tmp/lbatch%-timing%.[^/]+/%d+%.tmp$") then
        pool = pool + 1
        assert.is_true(tonumber(base) >= 20000 and tonumber(base) <= 29000 and base % 3000 == 2000, base)
      else
        bases[base] = true tmps[tmp] = true
      end
    end
    assert.is_true(pool > 0, "the whole suite did not run through run-all's job pool")
    assert.same({ ["20000"] = true, ["26000"] = true }, bases)
    local n = 0
    for t in pairs(tmps) do n = n + 1 assert.matches("^/tmp/lbatch%-mutate%.[^/]+/s[12]/tmp$", t) end
    assert.equal(2, n)
    -- the tree is as it was
    assert.equal(MODULE, H.read(dir .. "/lbatch/a.lua"))
  end)

  it("runs a survivor's whole suite in run-all's pool and stops it at the first failure, which it names", function()
    -- a spec the runner cannot map to c.lua (dofile): only the whole suite runs it
    H.write(dir .. "/spec/unit/z_spec.lua", 'local c = dofile("lbatch/c.lua")\n' ..
      'it("ands", function() assert.is_false(c.both(true, false)) end)\n')
    H.write(dir .. "/spec/unit/slow_spec.lua", 'it("waits", function() os.execute("sleep 120") end)\n')
    local t = os.time()
    local out = run(dir, "MUTATE_JOBS=1", "lbatch/c.lua")
    assert.matches("%] lbatch/c%.lua:3 andor#1 [^\n]*\n    killed by the whole suite %(spec/unit/z_spec%.lua%) %[", out)
    assert.matches("(Failure -> spec/unit/z_spec.lua @ 2: ands)", out, 1, true)
    assert.matches("1 killed, 0 survived", out, 1, true)
    assert.is_true(os.time() - t < 100, "the slow spec was not stopped")   -- (it sleeps 120 s)
  end)

  it("does not count a kill by a spec that fails without the mutant too", function()
    H.write(dir .. "/spec/unit/a_spec.lua", 'require "lbatch.a"\nit("fails", function() assert.equal(1, 2) end)\n')
    local out = run(dir, "MUTATE_WHOLE=0")
    assert.matches("killed by spec/unit/a_spec.lua, but spec/unit/a_spec.lua fails without the mutant too: UNSURE", out, 1, true)
    assert.matches("0 killed, 1 survived %(0 equivalent%), 0 stillborn, 2 unsure", out)
    assert.matches("exit 1\n$", out)
  end)

  it("on Ctrl-C stops every process it started and removes its temp copies", function()
    H.write(dir .. "/spec/unit/a_spec.lua", 'require "lbatch.a"\nit("waits", function() os.execute("sleep 60") end)\n')
    local log = dir .. "/log"
    -- a session of its own: its id names every process the run starts
    local sid = H.sh(("cd %s && setsid %s spec/mutate/run >%s 2>&1 & echo $!")
      :format(H.q(dir), "env -u MUTATE_SINCE -u MUTATE_ONLY -u MUTATE_LIST lua5.4", H.q(log))):match("%d+")
    local function in_session(what)
      return H.sh(("ps -eo pid=,sid=,args= | awk '$2 == %s && /%s/ { print $1 }'"):format(sid, what))
    end
    local sleeper
    for _ = 1, 150 do
      sleeper = in_session("sleep 60"):match("%d+")
      if sleeper then break end
      H.sleep(0.2)
    end
    assert.truthy(sleeper, "the spec of a mutant never ran")
    local copy = H.sh("readlink /proc/" .. sleeper .. "/cwd"):match("^(/tmp/lbatch%-mutate%.[%w]+)/s[12]/tree")
    assert.truthy(copy)
    os.execute("/bin/kill -INT -- -" .. sid)   -- Ctrl-C: SIGINT to its process group (dash's kill takes no group)
    for _ = 1, 100 do
      if in_session("") == "" then break end
      H.sleep(0.2)
    end
    assert.equal("", in_session(""))
    assert.is_false(H.exists(copy))
  end)
end)
