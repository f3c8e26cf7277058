-- The command's stdout on a device that takes no byte (/dev/full): a write
-- or flush that fails is an io error and exit 1, never a silent success.
local H = require "helper"

local function lbatch(args)
  local err = os.tmpname()
  local out = H.sh(("%s %s/bin/lbatch %s >/dev/full 2>%s; echo \"exit=$?\"; cat %s"):format(H.lua, H.root,
    args, err, err))
  os.remove(err)
  return tonumber(out:match("exit=(%d+)")), out
end

describe("the command's stdout on a full device", function()
  local f = io.open("/dev/full", "wb")
  local full = f and f:write("x") and f:flush() == nil
  if f then f:close() end

  it("fails the results it cannot write, and a command's last lines", function()
    if not full then return pending("no /dev/full here") end
    local path = os.tmpname()
    local line = '{"id":"r%d","custom_id":"c%d","response":{"status_code":200,"request_id":"x","body":'
      .. '{"choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":1,"completion_tokens":1}}},"error":null}\n'
    local fh = assert(io.open(path, "wb"))
    for i = 1, 3 do fh:write(line:format(i, i)) end
    fh:close()
    local code, text = lbatch("results " .. path)
    assert.are.equal(1, code, text)
    assert.matches("lbatch results: io: cannot write stdout: No space left on device", text, 1, true)
    fh = assert(io.open(path, "wb"))
    fh:write('{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
      .. '"messages":[{"role":"user","content":"hi"}]}}\n')
    fh:close()
    code, text = lbatch("estimate " .. path)   -- a few lines, in the buffer until exit
    assert.are.equal(1, code, text)
    assert.matches("lbatch estimate: io: cannot write stdout", text, 1, true)
    os.remove(path)
  end)
end)
