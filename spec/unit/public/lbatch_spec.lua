-- require "lbatch" (lbatch/init.lua) and lbatch/impl/transport/version.lua (no server, no nginx).
local H = require "helper"
local lbatch = require "lbatch"
local version = require "lbatch.impl.transport.version"
local service = require "lbatch.impl.api.service"
local errors = require "lbatch.impl.transport.errors"

describe("require 'lbatch'", function()
  it("has one version, semver, as _VERSION and VERSION", function()
    assert.is_string(version)
    assert.matches("^%d+%.%d+%.%d+$", version)
    assert.are.equal(version, lbatch._VERSION)
    assert.are.equal(version, lbatch.VERSION)
    assert.are.equal(version, require("lbatch.impl.api.client").VERSION)
  end)

  it("exposes the regions and the final statuses (the service's own tables)", function()
    assert.are.equal(service.REGIONS, lbatch.REGIONS)
    assert.are.equal(service.FINAL, lbatch.FINAL)
    assert.is_true(lbatch.FINAL.completed)
    assert.is_nil(lbatch.FINAL.in_progress)
  end)

  it("is_error tells lbatch's error objects from anything else", function()
    assert.is_true(lbatch.is_error(errors.new({ kind = "http", status = 500 })))
    for _, x in ipairs({ "lbatch: http 500", {}, { kind = "http" }, 1, false }) do
      assert.is_false(lbatch.is_error(x))
    end
    assert.is_false(lbatch.is_error(nil))
  end)

  it("new: a client with no network touched; a wrong option raises at the caller, naming it", function()
    local client = lbatch.new({ api_key = "sk-test", base_url = "https://api.example.invalid/v1" })
    assert.is_table(client)
    client:close()
    local ok, err = pcall(lbatch.new, { api_key = "sk-test", base_url = "https://x", max_retry = 1 })
    assert.is_false(ok)
    assert.matches("unknown option max_retry", err, 1, true)
    ok, err = pcall(lbatch.new, { api_key = "sk-test", base_url = "http://api.example.com/v1" })
    assert.is_false(ok)
    assert.matches("unencrypted", err, 1, true)
  end)

  it("has only these fields", function()
    local names = {}
    for k in pairs(lbatch) do names[#names + 1] = k end
    table.sort(names)
    assert.are.same({ "FINAL", "REGIONS", "VERSION", "_VERSION", "is_error", "new", "scheduler" }, names)
  end)

  it("version.lua is the only place the version is written (the rockspec is named after it)", function()
    local rockspec = H.sh("ls " .. H.q(H.root) .. "/rockspec/"):gsub("%s+$", "")
    assert.are.equal("lbatch-" .. version .. "-1.rockspec", rockspec)
  end)
end)
