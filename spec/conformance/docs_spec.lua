-- The API reference is made from the code's doc comments (LDoc, `make
-- docs`): every function a user can reach has one, and the reference shows
-- the public modules (public_api_spec's PUBLIC) and the client's methods, no
-- lbatch.impl.*, lbatch.cmd.* nor forwarder. Internal objects (the
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

-- the public modules, as spec/conformance/public_api_spec.lua declares them (one home: its PUBLIC)
local function public_names()
  local spec = H.read(H.root .. "/spec/conformance/public_api_spec.lua")
  local names = {}
  for name in assert(spec:match("\nlocal PUBLIC = (%b{})")):gmatch('"([%w_.]+)"') do names[#names + 1] = name end
  assert.is_true(#names > 5, "PUBLIC not found in public_api_spec.lua")
  return names
end

-- a public module's file in config.ld: the C core's reference is docs/ldoc/core.luadoc
local function file_of(name)
  if name == "lbatch" then return "lbatch/init.lua" end
  if name == "lbatch.core" then return "docs/ldoc/core.luadoc" end
  return name:gsub("%.", "/") .. ".lua"
end

-- the client's methods (what `lbatch.new` returns): name -> true, the _private ones left out
local function client_methods()
  local out = {}
  for line in io.lines(H.root .. "/lbatch/impl/api/client.lua") do
    local m = line:match("^function Client:([%a][%w_]*)%(")
    if m then out[m] = true end
  end
  return out
end

describe("the API reference", function()
  it("has a doc comment (---) for every public function", function()
    local missing = undocumented()
    assert.are.same({}, missing)
  end)

  it("lists in config.ld the public modules' files and the client's, nothing else", function()
    local want = { ["lbatch/impl/api/client.lua"] = true }
    for _, name in ipairs(public_names()) do want[file_of(name)] = true end
    local listed = {}
    for path in H.read(H.root .. "/config.ld"):match("\nfile = (%b{})"):gmatch('"([^"]+)"') do
      assert.is_truthy(H.read(H.root .. "/" .. path), path .. " (config.ld) does not exist")
      listed[path] = true
    end
    assert.are.same(want, listed)
  end)

  it("names in spec/README.md and docs/*.md only lbatch/ files that exist", function()
    local docs = { "spec/README.md" }
    for f in H.sh("cd " .. H.q(H.root) .. " && ls docs/*.md"):gmatch("[^\n]+") do docs[#docs + 1] = f end
    local n = 0
    for _, doc in ipairs(docs) do
      for path in H.read(H.root .. "/" .. doc):gmatch("lbatch/[%w_/]+%.[%a]+") do
        if path:find("^lbatch/[%l_/]+%.[%l]+$") and not path:find("^lbatch/build/") then   -- (not lbatch/X.lua, not a URL's)
          n = n + 1
          assert.is_true(H.exists(H.root .. "/" .. path), doc .. " names " .. path .. ", which does not exist")
        end
      end
    end
    assert.is_true(n > 10)
  end)

  it("documents with `make docs` the public modules and the client's methods only, with no warning #docs", function()
    if not H.ok("command -v ldoc >/dev/null") then pending("ldoc (lua-ldoc) is not installed") return end
    local dir = H.tmpdir()
    H.mkdir(dir .. "/modules")   -- a page left by a build before, of a module no longer documented
    H.write(dir .. "/modules/lbatch.impl.api.client.html", "<html></html>")
    local out = H.sh(("cd %s && make -s docs DOCS_DIR=%s 2>&1; echo \"exit=$?\""):format(H.q(H.root), H.q(dir)))
    assert.matches("exit=0\n$", out)
    -- no warning: LDoc's (a doc comment it cannot parse, a bad tag...) or any other line
    assert.are.equal(("API reference: %s/index.html\nexit=0\n"):format(dir), out)
    local documented, seen = {}, {}   -- (the index links each module twice: the side bar, the table)
    for kind, name in assert(H.read(dir .. "/index.html"), out):gmatch('href="(%a+)/([%w_.]+)%.html"') do
      if not seen[name] then documented[#documented + 1] = name end
      seen[name] = true
      assert.are.equal("modules", kind, name .. " is documented as a class, not as a module")
    end
    local public = public_names()
    table.sort(public) table.sort(documented)
    assert.are.same(public, documented)
    local pages = {}
    for f in H.sh("ls " .. H.q(dir .. "/modules")):gmatch("([%w_.]+)%.html") do pages[#pages + 1] = f end
    table.sort(pages)
    assert.are.same(public, pages)
    assert.is_false(H.exists(dir .. "/classes"))
    local page = assert(H.read(dir .. "/modules/lbatch.html"))
    local methods = client_methods()
    for _, m in ipairs({ "upload", "create", "retrieve", "cancel", "list", "content", "wait", "each_batch", "step" }) do
      assert.is_true(methods[m] ~= nil, "client:" .. m .. " is not in client.lua")
    end
    for m in pairs(methods) do assert.matches('name = "Client:' .. m .. '"', page, 1, true) end
    assert.is_nil(out:find("lbatch/impl/api/client.lua", 1, true), out)   -- no warning from the client's file
  end)
end)
