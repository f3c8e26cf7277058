-- The API reference is made from the code's doc comments (LDoc, `make
-- docs`): every function a user can reach has one. Internal objects (the
-- loop, a pipeline run, the results join, the transport, the command's handlers) are named
-- here and left out.
local H = require "helper"

local INTERNAL = { Join = true, Loop = true, Run = true, Transport = true, command = true }

local function undocumented()
  local missing = {}
  for path in H.sh("cd " .. H.root .. " && find lbatch -name '*.lua' | sort"):gmatch("[^\n]+") do
    local prev, n = {}, 0
    for line in io.lines(H.root .. "/" .. path) do
      n = n + 1
      local owner, name = line:match("^function ([%w_]+)[.:]([%w_]+)%(")
      if not owner then owner, name = line:match("^([%w_]+)%.([%w_]+) = ") end
      if owner and not INTERNAL[owner] and not name:find("^_") and line:find("function", 1, true) or
         (owner and not INTERNAL[owner] and line:find("= guarded", 1, true)) then
        local i, first = #prev, nil
        while i > 0 and prev[i]:find("^%-%-") do first, i = prev[i], i - 1 end
        if not (first and first:find("^%-%-%-")) then missing[#missing + 1] = ("%s:%d %s.%s"):format(path, n, owner, name) end
      end
      prev[#prev + 1] = line
    end
  end
  return missing
end

describe("the API reference", function()
  it("has a doc comment (---) for every public function", function()
    local missing = undocumented()
    assert.are.same({}, missing)
  end)

  it("lists every module in config.ld, so that the reference has them all", function()
    local ld = H.read(H.root .. "/config.ld")
    for path in H.sh("cd " .. H.root .. " && find lbatch -name '*.lua' | sort"):gmatch("[^\n]+") do
      local listed = ld:find('"' .. path .. '"', 1, true) or path == "lbatch/impl/transport/version.lua"   -- a string, no API
        or H.read(H.root .. "/" .. path):find("^%-%- Deprecated forwarder")   -- a forwarder: no API
      assert.is_truthy(listed, path .. " is not in config.ld")
    end
  end)

  it("builds with `make docs` into docs/api/ #docs", function()
    if not H.ok("command -v ldoc >/dev/null") then pending("ldoc (lua-ldoc) is not installed") return end
    local tree = H.scratch_checkout()   -- (make docs writes docs/api/ in the tree)
    local out = H.sh("cd " .. tree .. " && make -s docs 2>&1; echo \"exit=$?\"")
    assert.matches("exit=0", out)
    local index = H.read(tree .. "/docs/api/index.html")
    assert.is_string(index, out)
    for _, mod in ipairs({ "lbatch.impl.api.client", "lbatch.impl.transport.errors", "lbatch.jsonl", "lbatch.results", "lbatch.pipeline" }) do
      assert.matches(mod, index, 1, true)
    end
    local client = H.read(tree .. "/docs/api/classes/lbatch.impl.api.client.html")
      or H.read(tree .. "/docs/api/modules/lbatch.impl.api.client.html")
    assert.matches("each_batch", client)
    H.ok("rm -rf " .. tree)
  end)
end)
