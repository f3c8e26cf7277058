-- The providers' own SDKs (pinned in emulator/conformance/package.json)
-- hold the emulator's dialects to them: openai's AzureOpenAI client,
-- groq-sdk, together-ai and @cerebras/cerebras_cloud_sdk each run a
-- files-and-batches lifecycle (emulator/conformance/providers.mjs) against
-- the emulator in their provider's dialect.
local H = require "helper"

local SCRIPT = H.root .. "/emulator/conformance/providers.mjs"
local KEY = "sdk-key-0123456789abcdef"

-- the SDK of `sdk` against an emulator in `dialect`
local function run(sdk, dialect)
  local emu = H.emulator({ dialect = dialect, api_key = KEY, speed = 200, tls = false })
  local dir = H.tmpdir()
  local out = H.sh(("node %s %s %s %s %s 2>&1; echo \"exit=$?\""):format(SCRIPT, sdk, emu.url, KEY, dir))
  -- a failure says what the emulator's nginx said (its error log is the emulator's output)
  if not out:find("exit=0", 1, true) then out = out .. "\nthe emulator's log:\n" .. (H.read(emu.log) or ""):sub(-2000) end
  emu.stop()
  H.rm_rf(dir)
  return out, tonumber(out:match("exit=(%d+)"))
end

describe("the providers' SDKs against the emulator in their dialects #conformance", function()
  setup(function()
    assert(H.exists(H.root .. "/emulator/conformance/node_modules/groq-sdk"),
      "missing node modules: make emulator/conformance/node_modules/.installed")
  end)

  for _, name in ipairs({ "azure", "groq", "together", "cerebras" }) do
    it(name .. ": upload, create, retrieve, list, content, cancel, file, files, delete", function()
      local out, code = run(name, name)
      assert.are.equal(0, code, out)
      assert.matches(name .. ": %d+ checks passed", out)
    end)
  end

  it("catches a deviation: each SDK fails against OpenAI's dialect", function()
    for _, name in ipairs({ "azure", "groq", "together" }) do
      local out, code = run(name, "openai")
      assert.are_not.equal(0, code, name .. ": " .. out)
      assert.matches(name .. ": failed after", out)
    end
  end)
end)
