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
    for file in H.sh("cd " .. H.root .. " && ls lbatch/*.lua"):gmatch("[^\n]+") do
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
end)
