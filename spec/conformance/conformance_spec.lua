-- The official openai SDK (pinned in emulator/conformance/package.json)
-- runs the whole lifecycle against the emulator through Prism in
-- `proxy --errors` mode with the OpenAPI description vendored in
-- emulator/conformance/openapi (its README gives its source and licence).
local H = require "helper"

local SPEC = H.root .. "/emulator/conformance/openapi/batch-files-v1.patched.json"
local SCRIPT = H.root .. "/emulator/conformance/lifecycle.mjs"

local function run(emu)
  local dir = H.tmpdir()
  local out = H.sh(("node %s %s %s %s 2>&1; echo \"exit=$?\""):format(SCRIPT, emu.url, SPEC, dir))
  return out, tonumber(out:match("exit=(%d+)"))
end

describe("conformance with the openai SDK and the OpenAPI description #conformance", function()
  setup(function()
    assert(H.exists(SPEC), "missing " .. SPEC)
  end)

  it("runs the full lifecycle in the openai dialect with zero violations", function()
    local emu = H.emulator({ speed = 200, dialect = "openai" })
    local out, code = run(emu)
    emu.stop()
    assert.are.equal(0, code, out)
    assert.matches("prism: 0 violations", out)
    assert.matches("conformance: %d+ checks passed", out)
  end)

  it("catches a deviation: the dashscope dialect's nulls break the OpenAI schema", function()
    local emu = H.emulator({ speed = 200, dialect = "dashscope", rate_limits = false })
    local out, code = run(emu)
    emu.stop()
    assert.are_not.equal(0, code, out)
  end)
end)
