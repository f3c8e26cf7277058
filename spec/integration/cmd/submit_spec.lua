-- lbatch submit as careful as run: every check before anything leaves,
-- the same submit again finds what it made, Ctrl-C during the create
-- still names the batch. Through bin/lbatch on the emulator.
local H = require "helper"
local cjson = require "cjson"

local function pat(s) return (s:gsub("%p", "%%%0")) end

local CHAT = { url = "/v1/chat/completions", model = "qwen-plus" }

-- the exit code, stdout and stderr of bin/lbatch ARGS against the emulator
local function lbatch(emu, args) return H.lbatch(args, { emu = emu }) end

-- what the emulator holds: its files and its batches
local function list(emu, what)
  local data = select(2, H.json("GET", emu.base .. "/" .. what .. "?limit=100")).data
  return type(data) == "table" and data or {}          -- (an empty list may come as null)
end
local function files(emu) return list(emu, "files") end
local function batches(emu) return list(emu, "batches") end

describe("lbatch submit", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 400, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  it("uploads nothing when the file, the endpoint or the window is wrong", function()
    local good = H.requests(dir .. "/good.jsonl", 3, CHAT)
    local broken = H.write(dir .. "/broken.jsonl", H.read(good) .. "{oops\n")
    local questions = H.write(dir .. "/q.csv", "id,question\na,hello\n")
    for _, row in ipairs({
      { "submit " .. broken, 1, "broken%.jsonl:4: invalid_json_line" },
      { "submit " .. questions, 1, "q%.csv is a CSV" },
      { "submit --endpoint /v1/embeddings " .. good, 1, "nothing was uploaded" },
      { "submit --window 7x " .. good, 2, "%-%-window 7x: a completion window is hours or days" },
      { "submit --window 400h " .. good, 2, "from 24h to 336h" },
      { "submit --limits openai --window 1d " .. good, 2, "only 24h on openai" },
      { "submit --meta lbatch_submit=x " .. good, 2, "lbatch_ keys are lbatch's" },
    }) do
      local code, out, err = lbatch(emu, row[1])
      assert.are.equal(row[2], code, row[1] .. ": " .. out .. err)
      assert.matches(row[3], err)
      assert.are.equal("", out)
      assert.are.same({}, files(emu), row[1])
      assert.are.same({}, batches(emu), row[1])
    end
    -- --no-check sends what the user insists on (the service then fails it)
    local code, out, err = lbatch(emu, "submit --no-check --json " .. broken)
    assert.are.equal(0, code, out .. err)
    assert.are.equal(1, #files(emu))
    assert.are.equal("failed", H.wait_final(emu, cjson.decode(out).id).status)
  end)

  it("the same submit again finds its batch; --again makes a new one", function()
    local input = H.requests(dir .. "/twice.jsonl", 2, CHAT)
    local before = #batches(emu)
    local code, out, err = lbatch(emu, "submit --json --meta team=a " .. input)
    assert.are.equal(0, code, out .. err)
    local first = cjson.decode(out)
    assert.matches("%(100%%%)", err)                           -- uploaded, with progress
    code, out, err = lbatch(emu, "submit --json --meta team=a " .. input)
    assert.are.equal(0, code, out .. err)
    assert.are.equal(first.id, cjson.decode(out).id)
    assert.matches("already submitted: " .. pat(first.id) .. " %(created [^)]+%); %-%-again makes a new one", err)
    assert.is_nil(err:find("upload", 1, true))                 -- nothing sent again
    assert.are.equal(before + 1, #batches(emu))
    -- its file deleted since: the batch is still found by its stamp, nothing uploaded
    H.json("DELETE", emu.base .. "/files/" .. first.input_file_id)
    local stored = #files(emu)
    code, out, err = lbatch(emu, "submit --meta team=a " .. input)
    assert.are.equal(0, code, out .. err)
    assert.matches("already submitted: " .. pat(first.id), err)
    assert.are.same({ stored, before + 1 }, { #files(emu), #batches(emu) })
    -- other metadata is another batch
    code, out, err = lbatch(emu, "submit --meta team=b " .. input)
    assert.are.equal(0, code, out .. err)
    assert.is_nil(err:find("already", 1, true))
    assert.are.equal(before + 2, #batches(emu))
    code, out, err = lbatch(emu, "submit --json --again --meta team=a " .. input)
    assert.are.equal(0, code, out .. err)
    assert.are_not.equal(first.id, cjson.decode(out).id)
    assert.are.equal(before + 3, #batches(emu))
    -- and the plain one still finds one of its own, making none
    code = lbatch(emu, "submit --meta team=a " .. input)
    assert.are.equal(0, code)
    assert.are.equal(before + 3, #batches(emu))
  end)

  it("SIGINT during a slow create: the batch is printed, exit 130; the same submit makes no second", function()
    local input = H.requests(dir .. "/int.jsonl", 2, CHAT)
    local before = #batches(emu)
    H.json("POST", emu.url .. "/_emulator/faults", { json = { method = "POST", path = "^/v1/batches$", delay = 3 } })
    -- the create follows the look for an earlier batch (GET /batches) at once
    local function looks() return (type(emu.stats().routes) == "table" and emu.stats().routes["GET /batches"]) or 0 end
    local looked = looks()
    local pidfile, outfile = dir .. "/int.pid", dir .. "/int.out"
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch submit %s")
      :format(emu.base, H.lua, H.root, input)
    H.ok(("(%s >%s 2>%s.err & echo $! > %s; wait $!; echo \"exit=$?\" > %s.rc) &")
      :format(cmd, outfile, outfile, pidfile, pidfile))
    assert.is_true(H.await(function() return looks() > looked end, 30, 0.025))
    -- the create is out, held 3 s by the emulator: the last request it began
    assert.is_true(H.await(function()
      local _, last = H.json("GET", emu.url .. "/_emulator/last")
      return type(last) == "table" and last.method == "POST" and tostring(last.path):find("/batches$") ~= nil
    end, 20, 0.02))
    H.ok("kill -INT $(cat " .. pidfile .. ")")
    local rc = H.await(function()   -- (written whole: the shell makes the file before echo writes)
      local s = H.read(pidfile .. ".rc") return s and s:find("\n") and s end, 30)
    H.http("DELETE", emu.url .. "/_emulator/faults")
    assert.matches("exit=130", rc or "", H.read(outfile .. ".err"))
    local id = (H.read(outfile) or ""):match("^(batch_%S+)")
    assert.is_not_nil(id, H.read(outfile .. ".err"))
    assert.matches("interrupted; the batch " .. pat(id) .. " was made", H.read(outfile .. ".err"))
    assert.are.equal(before + 1, #batches(emu))
    local code, out, err = lbatch(emu, "submit " .. input)
    assert.are.equal(0, code, out .. err)
    assert.matches("already submitted: " .. pat(id), err)
    assert.are.equal(before + 1, #batches(emu))
  end)
end)
