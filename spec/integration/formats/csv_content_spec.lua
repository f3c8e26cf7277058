-- No empty request leaves: `lbatch run`, `csv2jsonl` and `validate` on a CSV
-- with a row without content, or without a content column, stop before
-- anything is uploaded (the emulator counts what it was sent), naming the
-- row; a header whose names come in another order is read by its names.
local H = require "helper"

describe("a CSV row without content", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 400, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function()
    emu.stop()
    H.rm_rf(dir)
  end)

  local function sent()
    local routes = emu.stats().routes
    local n = 0
    for _, v in pairs(type(routes) == "table" and routes or {}) do if type(v) == "number" then n = n + v end end
    return n
  end

  local function lbatch(args)
    local out = H.sh(("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch %s 2>&1; echo \"exit=$?\"")
      :format(emu.base, H.lua, H.root, args))
    return tonumber(out:match("exit=(%d+)%s*$")), out
  end

  it("stops run before any upload, naming the row, and csv2jsonl writes nothing", function()
    for name, case in pairs({
      empty = { "c1,hello\nc2,\n", "empty.csv:2: row 2 (c2) has no content" },
      one_column = { "c1\nc2\n", "one_column.csv:1: row 1 has no content column" },
      named = { "question,id\nhello,c1\n,c2\n", "named.csv:3: row 3 (c2) has no content: the \"question\" column (1)" },
    }) do
      local src = H.write(("%s/%s.csv"):format(dir, name), case[1])
      local before = sent()
      local code, out = lbatch(("run %s --model qwen-plus --dir %s/%s.run --poll 0.05"):format(src, dir, name))
      assert.are_not.equal(0, code, out)
      assert.matches(case[2], out, 1, true)
      assert.are.equal(before, sent(), name .. ": nothing may be uploaded\n" .. out)
      code, out = lbatch(("csv2jsonl %s %s/%s.jsonl --model qwen-plus"):format(src, dir, name))
      assert.are.equal(1, code, out)
      assert.matches(case[2], out, 1, true)
      assert.is_false(H.exists(("%s/%s.jsonl"):format(dir, name)))
      code, out = lbatch(("validate %s --model qwen-plus"):format(src))
      assert.are.equal(1, code, out)
      assert.matches("csv_no_content " .. case[2]:match("^[^:]*:%d+: (.*)$"), out, 1, true)
      assert.matches("1 problem(s)", out, 1, true)
    end
  end)

  it("a header question,id is a header: the run sends c1 with its question", function()
    local src = H.write(dir .. "/swapped.csv", "question,id\nWhat is 2 + 2?,c1\n")
    local code, out = lbatch(("run %s --model qwen-plus --dir %s/swapped.run --poll 0.05 --output %s/swapped.jsonl")
      :format(src, dir, dir))
    assert.are.equal(0, code, out)
    assert.matches("taken as a header and skipped: question,id", out, 1, true)
    assert.matches("1 requests, 1 ok", out, 1, true)
    local req = require("cjson").decode((H.read(dir .. "/swapped.run/requests.jsonl") or "{}"):match("^[^\n]*"))
    assert.are.same({ "c1", "What is 2 + 2?" }, { req.custom_id, req.body.messages[1].content })
  end)
end)
