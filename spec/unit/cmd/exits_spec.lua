-- The command's exit codes and messages, one row per outcome: done (0),
-- a failure (1: the service, a file, problems found), wrong usage (2),
-- each final status of a batch (completed 0; failed, expired and
-- cancelled 3), for `status`, `status --wait` and `run`, and a run's
-- canary that failed its check (4: nothing past it sent). A script that
-- runs lbatch relies on exactly these (lbatch --help, README).
local H = require "helper"
local cjson = require "cjson"

-- requests for a model with no limit on batches running at once (the test model has 2)
local CHAT = { url = "/v1/chat/completions", model = "qwen-plus" }

-- bin/lbatch ARGS against emu; with `key`, no emulator: that key alone
local function lbatch(emu, args, key)
  if key then return H.lbatch(args, { env = "DASHSCOPE_API_KEY=" .. key }) end
  return H.lbatch(args, { emu = emu })
end

describe("the command's exit codes", function()
  local emu, dir, ids = nil, nil, {}
  setup(function()
    emu = H.emulator({ speed = 400, rate_limits = false })
    dir = H.tmpdir()
    local function upload(path)
      local _, f = H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. path } })
      return f.id
    end
    local function create(fid, meta)
      local _, b = H.json("POST", emu.base .. "/batches", { json = { input_file_id = fid,
        endpoint = "/v1/chat/completions", completion_window = "24h", metadata = meta } })
      return b.id
    end
    local good = upload(H.requests(dir .. "/good.jsonl", 2, CHAT))
    ids.completed = create(good)
    -- a file the service refuses at validation: the batch fails
    ids.failed = create(upload(H.write(dir .. "/bad.jsonl", H.read(dir .. "/good.jsonl") .. "{oops\n")))
    ids.expired = create(upload(H.requests(dir .. "/slow.jsonl", 10, CHAT)), { emulator_line_seconds = "18000" })
    ids.cancelled = create(upload(H.requests(dir .. "/slow2.jsonl", 4, CHAT)), { emulator_line_seconds = "18000" })
    H.wait_status(emu, ids.expired, "in_progress")
    H.json("POST", emu.base .. "/batches/" .. ids.cancelled .. "/cancel")
    assert.are.equal("cancelled", H.wait_final(emu, ids.cancelled).status)   -- before the clock moves
    H.json("POST", emu.url .. "/_emulator/clock", { json = { advance = 25 * 3600 } })
    for status, id in pairs(ids) do assert.are.equal(status, H.wait_final(emu, id).status) end
  end)
  teardown(function() emu.stop() end)

  -- status: the final status sets the exit code; stdout names the batch and its status
  for _, row in ipairs({
    { "completed", 0 }, { "failed", 3 }, { "expired", 3 }, { "cancelled", 3 },
  }) do
    local status, want = row[1], row[2]
    it(("exits %d for a batch that ended %s, with status and status --wait"):format(want, status), function()
      for _, args in ipairs({ "status " .. ids[status], "status --wait --poll 0.05 " .. ids[status] }) do
        local code, out, err = lbatch(emu, args)
        assert.are.equal(want, code, args .. ": " .. out .. err)
        assert.matches(ids[status]:gsub("%-", "%%-") .. "%s+" .. status .. " ", out)
        local jcode, json = lbatch(emu, args .. " --json")
        assert.are.equal(want, jcode)
        assert.are.equal(status, cjson.decode(json).status)
      end
    end)
  end

  -- every other outcome: the code, and the words on stdout or stderr
  for _, row in ipairs({
    { "done: --help", "--help", 0, "out", "Usage: lbatch" },
    { "done: a command's --help", "status --help", 0, "out", "Usage: lbatch status" },
    { "done: a valid file", "validate %s/good.jsonl", 0, "out", "2 lines" },
    { "failure: problems found", "validate %s/bad.jsonl", 1, "out", "bad%.jsonl:3: invalid_json_line" },
    { "failure: a file that is not there", "validate %s/none.jsonl", 1, "err", "^lbatch validate: .*cannot read" },
    { "failure: the service's 404", "status batch_nope", 1, "err", "^lbatch status: .*404" },
    { "failure: submit a file that is not there", "submit %s/none.jsonl", 1, "err",
      "^lbatch submit: io: cannot read [^\n]*none%.jsonl" },
    { "failure: the service's 404, in JSON", "status batch_nope --json", 1, "json", 404 },
    { "usage: no command", "", 2, "out", "Usage" },
    { "usage: an unknown command", "frobnicate", 2, "err", "^lbatch: unknown command frobnicate" },
    { "usage: a missing argument", "status", 2, "err", "^lbatch status: expected BATCH_ID" },
    { "usage: too many arguments", "status a b", 2, "err", "^lbatch status: expected" },
    { "usage: an unknown option", "list --stauts x", 2, "err", "^lbatch list: unknown option %-%-stauts" },
    { "usage: an option without its value", "list --limit", 2, "err", "^lbatch list:" },
    { "usage: a CSV without --model", "run q.csv", 2, "err", "%-%-model is required for a CSV" },
  }) do
    local name, args, want, where, text = row[1], row[2], row[3], row[4], row[5]
    it(("exits %d: %s"):format(want, name), function()
      local code, out, err = lbatch(emu, args:format(dir))
      assert.are.equal(want, code, out .. err)
      if where == "json" then
        assert.are.equal(text, cjson.decode(out).error.status)
      else
        assert.matches(text, where == "out" and out or err)
      end
      if want == 2 then assert.are.equal("", where == "err" and out or "") end   -- usage: nothing on stdout
    end)
  end

  it("submit: exits 0, the batch on stdout, its upload's progress on stderr in a few lines", function()
    -- 24 MB to a server that takes 1 MB every 100 ms (more than the
    -- sockets' buffers hold): progress is reported some 20 times; off a
    -- terminal a line is printed at most every 5 s, and the last one (100%)
    -- (lines the service takes: submit checks them first; --again: this
    -- server answers no list of files or batches to look in)
    local big = H.requests(dir .. "/big.jsonl", 6, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function() return ("w "):rep(2000000) end })
    local srv = H.hostile()
    local code, out, err = lbatch(nil, ("submit --again --base-url %s %s"):format(srv.at("slow_reader-1024"), big), "k")
    srv.stop()
    assert.are.equal(0, code, out .. err)
    assert.matches("^batch_%S+%s+validating", out)
    local lines = {}
    for l in err:gmatch("upload [^\n]*") do lines[#lines + 1] = l end
    assert.is_true(#lines >= 1 and #lines <= 4, err)
    assert.matches("%(100%%%)", lines[#lines])
    local whole = 0
    for _, l in ipairs(lines) do if l:find("(100%)", 1, true) then whole = whole + 1 end end
    assert.are.equal(1, whole, err)                   -- the end said once
  end)

  it("run: exits 0 when every request came back", function()
    local csvp = H.write(dir .. "/q.csv", "id,question\na,one\nb,two\n")
    local code, out, err = lbatch(emu, ("run --model batch-test-model --endpoint /v1/chat/ds-test --poll 0.05 %s"):format(csvp))
    assert.are.equal(0, code, out .. err)
    assert.matches("2 requests, 2 ok, 0 failed, 0 missing", out)
  end)

  it("run: exits 4 when its canary fails its check, the rest not sent", function()
    local input = H.requests(dir .. "/canary.jsonl", 6, CHAT)
    local check = H.write(dir .. "/never.lua", 'return function() return false, "never good" end\n')
    local batches = (emu.stats().routes or {})["POST /batches"] or 0
    local code, out, err = lbatch(emu, ("run %s --dir %s/canary --poll 0.05 --canary 2 --canary-check %s"):format(
      input, dir, check))
    assert.are.equal(4, code, out .. err)
    assert.matches("canary: 2 of 2 requests, 0 passed %(0%%%), min 95%%: stopped: 4 held, nothing more sent", err)
    assert.matches("^lbatch run: .*canary_failed.*never good", err:match("[^\n]*canary_failed[^\n]*"))
    assert.are.equal("", out)
    assert.are.equal(batches + 1, emu.stats().routes["POST /batches"])
  end)

  -- a failed batch says why without --json; download of one with nothing says so
  it("status and download: a failed batch's errors in plain words, exit 3; a running one exit 0", function()
    local function batch(path, meta)
      local _, f = H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. path } })
      local _, b = H.json("POST", emu.base .. "/batches", { json = { input_file_id = f.id,
        endpoint = "/v1/chat/completions", completion_window = "24h", metadata = meta } })
      return b.id
    end
    H.json("POST", emu.url .. "/_emulator/modes", { json = { token_limit = { tokens = 1 } } })
    local quota = batch(H.requests(dir .. "/quota.jsonl", 2, CHAT))
    assert.are.equal("failed", H.wait_final(emu, quota).status)
    H.json("POST", emu.url .. "/_emulator/modes", { json = { token_limit = false } })
    local code, out, err = lbatch(emu, "status " .. quota)
    assert.are.equal(3, code, out .. err)
    assert.matches("failed%s+0/0 done, 0 failed[^\n]*\n  error token_limit_exceeded: %S", out)
    code, out, err = lbatch(emu, ("download %s --output %s/q.out"):format(quota, dir))
    assert.are.equal(3, code, out .. err)
    assert.matches("nothing to download: [^\n]* ended failed with no output or error file\n  error "
      .. "token_limit_exceeded: %S", out)
    assert.is_false(H.exists(dir .. "/q.out"))
    -- a refused file: its problems with their lines
    code, out = lbatch(emu, "status " .. ids.failed)
    assert.are.equal(3, code, out)
    assert.matches("\n  error %S+ line 3: %S", out)
    -- line errors: counted by code
    local mixed = batch(H.requests(dir .. "/mixed.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function(i) return i == 2 and "lbatch-emulator:fail" or "q" end }))
    assert.are.equal("completed", H.wait_final(emu, mixed).status)
    code, out, err = lbatch(emu, "status " .. mixed)
    assert.are.equal(0, code, out .. err)
    assert.matches("\n  failed lines: 1 %S+\n?$", out)
    -- still running: exit 0, saying so
    local slow = batch(H.requests(dir .. "/slow3.jsonl", 2, CHAT), { emulator_line_seconds = "18000" })
    code, out, err = lbatch(emu, "download " .. slow)
    assert.are.equal(0, code, out .. err)
    assert.matches("nothing to download yet: [^\n]* is [%l_]+ %(%d+/%d+ done%)", out)
    H.json("POST", emu.base .. "/batches/" .. slow .. "/cancel")
  end)
end)

describe("plain Lua 5.1", function()
  -- the checkout's modules and the core built for `v`, on a service that is not there
  -- (5.1's core built here, in a temp dir: spec/run-all builds build/5.1 at the same time)
  local cores = { jit = H.root .. "/build/jit" }
  local function on(v, cmd)
    return H.sh(("cd %s && env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=http://127.0.0.1:9/v1 LUA_PATH='./?.lua;./?/init.lua;;'"
      .. " LUA_CPATH=%s %s 2>&1; echo \"exit=$?\""):format(H.q(H.root), H.q(cores[v] .. "/?.so;;"), cmd))
  end

  it("is refused by the command and by lbatch.new, naming the Luas that work; the offline commands run", function()
    if not H.ok("command -v lua5.1 >/dev/null 2>&1") then return pending("lua5.1 is not installed") end
    local out_dir = H.tmpdir()
    assert.is_true(H.ok(("make -s -C %s compat COMPAT=5.1 COMPAT_OUT=%s CFLAGS=-O0 >/dev/null 2>&1"):format(H.q(H.root), H.q(out_dir))))
    cores["5.1"] = out_dir .. "/5.1"
    local want = "lbatch needs Lua 5.2 to 5.4 or LuaJIT 2.1: plain Lua 5.1 cannot yield across pcall"
    local out = on("5.1", "lua5.1 bin/lbatch list")
    assert.matches("^lbatch list: config: " .. want:gsub("%p", "%%%0"), out)
    assert.matches("exit=1\n$", out)
    out = on("5.1", "lua5.1 bin/lbatch run spec/fixtures/nope.jsonl")
    assert.matches("^lbatch run: config: " .. want:gsub("%p", "%%%0"), out)
    -- assert(lbatch.new{...}) shows the text, not 5.1's "bad argument #2 to 'assert'"
    local new = [[-e 'local c = assert(require("lbatch").new({ api_key = "k" })) print(type(c))']]
    out = on("5.1", "lua5.1 " .. new)
    assert.matches(want, out, 1, true)
    assert.is_nil(out:find("bad argument", 1, true), out)
    assert.matches("exit=1\n$", out)
    out = on("5.1", [[lua5.1 -e 'require("lbatch").scheduler()']])
    assert.matches(want, out, 1, true)
    out = on("jit", "luajit " .. new)                   -- LuaJIT (a 5.1) is not refused
    assert.are.equal("table\nexit=0\n", out)
    -- the offline commands and the pure modules still run on 5.1
    local f = H.requests(H.tmpdir() .. "/ok.jsonl", 2, CHAT)
    out = on("5.1", "lua5.1 bin/lbatch validate " .. H.q(f))
    assert.matches("0 problem%(s%).*exit=0\n$", out)
    out = on("5.1", "lua5.1 bin/lbatch --version")
    assert.matches("^lbatch %d+%.%d+%.%d+\nexit=0\n$", out)
  end)
end)
