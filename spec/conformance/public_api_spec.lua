-- The public API, declared: the modules a user requires (the README's and
-- examples/') stay `lbatch.X` in lbatch/; everything else is internal, under
-- `lbatch.impl.<layer>.X` (lbatch/impl/<layer>/) or `lbatch.cmd.X` (the
-- command, lbatch/cmd/); the old names the CHANGELOG announced are one-line
-- forwarders, deprecated, removed at 2.0. Held here on the source tree, on
-- what `luarocks make` installs and on the C core's exported symbols.
local H = require "helper"

local PUBLIC = { "lbatch", "lbatch.core", "lbatch.csv", "lbatch.flow", "lbatch.json", "lbatch.jsonl",
  "lbatch.lua_http", "lbatch.notify", "lbatch.openresty", "lbatch.pipeline", "lbatch.results" }
local NEEDS_HOST = { ["lbatch.openresty"] = "ngx", ["lbatch.lua_http"] = "http.server" }

local function set(list) local s = {} for _, v in ipairs(list) do s[v] = true end return s end

-- lbatch/X.lua files that start "-- Deprecated forwarder": name -> the name they forward to
local function forwarders()
  local out = {}
  for path in H.sh("cd " .. H.root .. " && ls lbatch/*.lua"):gmatch("[^\n]+") do
    local text = H.read(H.root .. "/" .. path)
    if text:find("^%-%- Deprecated forwarder") then
      out["lbatch." .. path:match("([%w_]+)%.lua$")] = text:match('\nreturn require "([%w_.]+)"\n$')
    end
  end
  return out
end

-- a module name -> its file, as require finds it from a tree's root
local function name_of(rel)
  local name = rel:gsub("%.lua$", ""):gsub("%.so$", ""):gsub("/init$", ""):gsub("/", ".")
  return name
end

local function requires_of(text, into)
  for name in text:gmatch("require%s*%(?%s*[\"'](lbatch[%w_.]*)[\"']") do into[name] = true end
  return into
end

describe("the public API", function()
  it("is what the README and the examples require, and nothing else is at the top", function()
    local used = requires_of(H.read(H.root .. "/README.md"), {})
    for f in H.sh("cd " .. H.root .. " && find examples -name '*.lua' | sort"):gmatch("[^\n]+") do
      requires_of(H.read(H.root .. "/" .. f), used)
    end
    local public = set(PUBLIC)
    for name in pairs(used) do assert.is_true(public[name], name .. " is required by the README or examples: keep it public") end
    local fw = forwarders()
    for path in H.sh("cd " .. H.root .. " && ls lbatch/*.lua"):gmatch("[^\n]+") do
      local name = name_of(path)
      assert.is_true(public[name] or fw[name] ~= nil, path .. " is neither public nor a forwarder: move it under lbatch/impl")
    end
  end)

  it("loads by every public name, and every forwarder gives its module and prints nothing", function()
    for _, name in ipairs(PUBLIC) do
      local host = NEEDS_HOST[name]
      if host and not pcall(require, host) then
        assert.is_string(package.searchpath(name, package.path), name)   -- only loads inside its host
      else
        assert.is_truthy(require(name), name)
      end
    end
    local names = {}
    for old, new in pairs(forwarders()) do
      assert.are.equal(require(new), require(old), old .. " does not forward to " .. new)
      names[#names + 1] = ("require %q"):format(old)
    end
    assert.is_true(#names > 0, "no forwarder: lbatch/X.lua files that start \"-- Deprecated forwarder\"")
    local cmd = ("cd %s && %s -e %s 2>&1"):format(H.q(H.root), H.lua, H.q(table.concat(names, " ")))
    assert.are.equal("", H.sh(cmd))
  end)

  it("exports one C entry point from the core, luaopen_lbatch_core", function()
    local so = assert(package.searchpath("lbatch.core", package.cpath))
    local syms = H.sh("nm -D --defined-only " .. H.q(so) .. " | awk '$3 ~ /^luaopen_/ {print $3}'")
    assert.are.equal("luaopen_lbatch_core\n", syms)
  end)

  it("installs with luarocks only the public names, the forwarders and lbatch.impl.*, lbatch.cmd.* #install", function()
    if not H.ok("command -v luarocks >/dev/null") then pending("luarocks is not installed") return end
    local tree = H.scratch_checkout()   -- (luarocks make compiles in the checkout)
    local dest = H.tmpdir()
    local out = H.sh(("cd %s && luarocks make --deps-mode=none --tree %s rockspec/lbatch-*.rockspec 2>&1; echo \"exit=$?\"")
      :format(H.q(tree), H.q(dest)))
    assert.matches("exit=0\n$", out)
    local installed = {}
    for rel in H.sh(("cd %s && find share/lua lib/lua -path '*/lbatch*' \\( -name '*.lua' -o -name '*.so' \\) | sort")
        :format(H.q(dest))):gmatch("[^\n]+") do
      installed[name_of(rel:gsub("^[^/]+/lua/[%d.]+/", ""))] = true
    end
    local allowed, fw = set(PUBLIC), forwarders()
    for name in pairs(fw) do allowed[name] = true end
    for _, name in ipairs(PUBLIC) do assert.is_true(installed[name], name .. " is not installed") end
    for name in pairs(fw) do assert.is_true(installed[name], name .. " (forwarder) is not installed") end
    local impl = 0
    for name in pairs(installed) do
      local internal = name:find("^lbatch%.impl%.[%w_]+%.[%w_]+$") or name:find("^lbatch%.cmd%.[%w_]+$")
      if internal then impl = impl + 1 end
      assert.is_truthy(allowed[name] or internal, name .. " is installed outside the public names and lbatch.impl/lbatch.cmd")
    end
    assert.is_true(impl > 0)
    H.ok("rm -rf " .. H.q(tree) .. " " .. H.q(dest))
  end)
end)
