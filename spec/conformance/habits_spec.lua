-- The habits a maintainer relies on: one version, every module in the
-- rockspec, nothing read from outside the project, a licence and a
-- changelog.
local H = require "helper"
local lbatch = require "lbatch"

local function rockspec()
  local path = H.sh("ls " .. H.root .. "/rockspec/lbatch-*.rockspec"):gsub("%s+$", "")
  local text, env = H.read(path), {}
  local chunk
  if setfenv then
    chunk = assert(loadstring(text))
    setfenv(chunk, env)
  else
    chunk = assert(load(text, "rockspec", "t", env))
  end
  chunk()
  return env, path
end

local function name_line(line) return line .. "\nrc=1\n" end

describe("habits", function()
  it("has one version: lbatch._VERSION, the rockspec's name and its version agree", function()
    local spec, path = rockspec()
    assert.matches("^%d+%.%d+%.%d+$", lbatch._VERSION)
    assert.are.equal(lbatch._VERSION .. "-1", spec.version)
    assert.are.equal("lbatch-" .. spec.version .. ".rockspec", path:match("[^/]+$"))
    local changelog = H.read(H.root .. "/CHANGELOG.md")
    assert.matches("## " .. lbatch._VERSION:gsub("%.", "%%."), changelog)
  end)

  it("installs every module: the rockspec lists each lbatch/*.lua and the C core's sources", function()
    local spec = rockspec()
    local listed = {}
    for name, src in pairs(spec.build.modules) do
      if type(src) == "string" then listed[src] = name end
    end
    for file in H.sh("cd " .. H.root .. " && find lbatch -name '*.lua' | sort"):gmatch("[^\n]+") do
      assert.is_string(listed[file], file .. " is not in the rockspec")
    end
    local core = spec.build.modules["lbatch.core"].sources
    for file in H.sh("cd " .. H.root .. " && ls lbatch/core/*.c"):gmatch("[^\n]+") do
      local found = false
      for _, s in ipairs(core) do found = found or s == file end
      assert.is_true(found, file .. " is not in the rockspec")
    end
  end)

  it("reads nothing from outside the project (a user's clone has nothing beside it)", function()
    local hits = H.sh("cd " .. H.root .. " && git grep -nI '\\.\\./shared' -- . ':!*.md' ':!spec/conformance/habits_spec.lua' 2>/dev/null")
    assert.are.equal("", hits)
  end)

  it("has a licence, and a changelog", function()
    assert.matches("MIT License", H.read(H.root .. "/LICENSE"))
    assert.are.equal("MIT", rockspec().description.license)
    assert.is_string(H.read(H.root .. "/CHANGELOG.md"))
  end)
  -- No function over 80 lines in lbatch/ (spec/tools/fnlen)
  it("keeps every function in lbatch/ (Lua and C) to 80 lines at most (spec/tools/fnlen)", function()
    local out = H.sh("cd " .. H.q(H.root) .. " && spec/tools/fnlen 2>&1; echo rc=$?")
    assert.are.equal("rc=0\n", out)
  end)

  it("spec/tools/fnlen names a function of 81 lines, in Lua and in C, and lets 80 through", function()
    local dir = H.tmpdir()
    local function body(n) return string.rep("  x = x + 1\n", n) end
    -- a Lua function of N lines in all: its first line, N - 2 of body, its end
    local function lua(n) return "local x = 0\nlocal function long_one()\n" .. body(n - 2) .. "end\nreturn long_one\n" end
    -- a C function of N lines from its "{" to its "}"
    local function c(n) return "static int x;\nstatic int\nlong_one(int a,\n         int b) {\n" .. body(n - 2) .. "}\n" end
    -- the same with its "{" alone at column 0
    local function c0(n) return "static int\nlong_one(int a)\n{\n" .. body(n - 2) .. "}\n" end
    local function run(name, text)
      H.write(dir .. "/" .. name, text)
      return H.sh("cd " .. H.q(dir) .. " && " .. H.q(H.root .. "/spec/tools/fnlen") .. " " .. name .. "; echo rc=$?")
    end
    assert.are.equal(name_line("long.lua:2 long_one 81 lines"), run("long.lua", lua(81)))
    assert.are.equal(name_line("long.c:3 long_one 81 lines"), run("long.c", c(81)))
    assert.are.equal("rc=0\n", run("ok.lua", lua(80)))
    assert.are.equal("rc=0\n", run("ok.c", c(80)))
    assert.are.equal(name_line("long0.c:2 long_one 81 lines"), run("long0.c", c0(81)))
    assert.are.equal("rc=0\n", run("ok0.c", c0(80)))
  end)
end)
