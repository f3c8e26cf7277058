-- The command's output files: written whole or not at all (a full disk
-- leaves nothing at the destination and a non-zero exit), and valid UTF-8
-- JSON and CSV whatever bytes the service's results held.
local H = require "helper"

local function lbatch(emu, args)
  local code, out, err = H.lbatch(args, { emu = emu })
  return code, out .. err, out
end

-- a 64 KiB tmpfs, nearly full (a few KiB left), at dir/full; nil when
-- this process may not mount (not root)
local function full_disk(dir)
  local mnt = H.mkdir(dir .. "/full")
  if not H.ok(("mount -t tmpfs -o size=64k tmpfs %s 2>/dev/null"):format(H.q(mnt))) then return nil end
  H.ok(("dd if=/dev/zero of=%s/filler bs=1k count=60 2>/dev/null"):format(H.q(mnt)))
  return mnt
end

local function listing(dir) return H.sh("ls -A " .. H.q(dir)) end

describe("lbatch run and flow --output on a full disk", function()
  local emu, dir, mnt
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
    mnt = full_disk(dir)
  end)
  teardown(function()
    if mnt then H.ok("umount " .. H.q(mnt)) end
    emu.stop()
  end)

  it("run --output: exit 1, the error names the file, nothing left at the destination", function()
    if not mnt then pending("mount not allowed here (needs root)") return end
    local reqs = H.requests(dir .. "/r.jsonl", 80, { content = function(i) return ("question %d "):format(i):rep(8) end })
    local code, text = lbatch(emu, ("run %s --dir %s/run --poll 0.05"):format(reqs, dir))
    assert.are.equal(0, code, text)
    for _, out in ipairs({ "out.jsonl", "out.csv" }) do
      code, text = lbatch(emu, ("run %s --dir %s/run --poll 0.05 --output %s/%s"):format(reqs, dir, mnt, out))
      assert.are.equal(1, code, text)
      assert.matches("cannot write " .. mnt .. "/" .. out, text, 1, true)
      assert.are.equal("filler\n", listing(mnt))                      -- no file, no temp file
    end
    -- a file already there is left as it was
    H.write(mnt .. "/out.jsonl", "old\n")
    code, text = lbatch(emu, ("run %s --dir %s/run --poll 0.05 --output %s/out.jsonl"):format(reqs, dir, mnt))
    assert.are.equal(1, code, text)
    assert.are.equal("old\n", H.read(mnt .. "/out.jsonl"))
    assert.are.equal("filler\nout.jsonl\n", listing(mnt))
    os.remove(mnt .. "/out.jsonl")
    -- and where there is room, the whole file
    code, text = lbatch(emu, ("run %s --dir %s/run --poll 0.05 --output %s/whole.jsonl"):format(reqs, dir, dir))
    assert.are.equal(0, code, text)
    assert.are.equal(80, select(2, H.read(dir .. "/whole.jsonl"):gsub("\n", "")))
  end)

  it("flow --output: exit 1, not a success, nothing left at the destination", function()
    if not mnt then pending("mount not allowed here (needs root)") return end
    local lines = { "id,question" }
    for i = 1, 60 do lines[#lines + 1] = ("q%d,What is %d + %d? Say it at length, please."):format(i, i, i) end
    H.write(dir .. "/items.csv", table.concat(lines, "\n") .. "\n")
    local script = H.root .. "/spec/fixtures/judge_flow.lua"
    local args = ("flow %s --items %s/items.csv --dir %s/flow --poll 0.05"):format(script, dir, dir)
    local code, text = lbatch(emu, args)
    assert.are.equal(0, code, text)
    code, text = lbatch(emu, args .. " --output " .. mnt .. "/flow.jsonl")
    assert.are.equal(1, code, text)
    assert.matches("cannot write " .. mnt .. "/flow.jsonl", text, 1, true)
    assert.is_nil(text:find("60 done", 1, true), text)
    assert.are.equal("filler\n", listing(mnt))
    code, text = lbatch(emu, args .. " --output " .. dir .. "/flow-out.jsonl")
    assert.are.equal(0, code, text)
    assert.are.equal(60, select(2, H.read(dir .. "/flow-out.jsonl"):gsub("\n", "")))
  end)

  it("download: the error reads as a local file's (io), with no HTTP status in its text", function()
    if not mnt then pending("mount not allowed here (needs root)") return end
    local reqs = H.requests(dir .. "/big.jsonl", 100)
    local code, text = lbatch(emu, ("run %s --dir %s/big --poll 0.05"):format(reqs, dir))
    assert.are.equal(0, code, text)
    local _, list = H.json("GET", emu.base .. "/batches?limit=1")
    code, text = lbatch(emu, ("download %s --output %s/got.jsonl"):format(list.data[1].output_file_id, mnt))
    assert.are.equal(1, code, text)
    assert.is_truthy(text:find("\nlbatch download: io: cannot write " .. mnt .. "/got.jsonl", 1, true), text)
    assert.is_nil(text:find("io 200", 1, true), text)
    assert.are.equal("filler\n", listing(mnt))
  end)
end)

describe("a resumed run's stamps", function()
  it("name its shards by whole numbers (1, not 1.0) in metadata and ds_name", function()
    local emu = H.emulator({ speed = 200, rate_limits = false })
    local dir = H.tmpdir()
    local reqs = H.requests(dir .. "/r.jsonl", 3)
    -- every create refused: the run stops with its shards in the journal
    H.json("POST", emu.url .. "/_emulator/faults",
      { json = { method = "POST", path = "^/v1/batches$", status = 400, times = 100 } })
    local args = ("run %s --dir %s/d --max-lines 1 --poll 0.05"):format(reqs, dir)
    local code, text = lbatch(emu, args)
    assert.are.equal(1, code, text)
    H.http("DELETE", emu.url .. "/_emulator/faults")
    code, text = lbatch(emu, args)                                  -- resumed: the shards read back
    assert.is_true(code == 0 or code == 3, text)
    local _, list = H.json("GET", emu.base .. "/batches?limit=10")
    emu.stop()
    local seen = {}
    for _, b in ipairs(list.data) do
      local shard = b.metadata.lbatch_shard
      assert.matches("^%d+$", shard)
      assert.matches("^lbatch%-%x+%-" .. shard .. "$", b.metadata.ds_name)
      seen[#seen + 1] = tonumber(shard)
    end
    table.sort(seen)
    assert.are.same({ 1, 2, 3 }, seen)
  end)
end)

describe("the command interrupted", function()
  it("exits 130 with one line at any moment, modules loading or reading, never a traceback", function()
    local dir = H.tmpdir()
    local big = H.requests(dir .. "/big.jsonl", 60000)   -- read for longer than the last moment
    -- five moments from the start (modules loading: a busy machine may not
    -- have set the handler yet, and a background job of sh ignores SIGINT
    -- until then), five from when it has the file open (reading)
    local script = H.write(dir .. "/int.sh", ([[
for d in 0 0.01 0.02 0.05 0.1 r0 r0.01 r0.02 r0.03 r0.05; do
  rm -f %s/err
  %s %s/bin/lbatch validate %s >/dev/null 2>%s/err &
  pid=$!
  r=""
  case $d in r*) d=${d#r}; n=0
    until ls -l /proc/$pid/fd 2>/dev/null | grep -q big.jsonl || [ $n -ge 3000 ]; do sleep 0.01; n=$((n + 1)); done ;;
  esac
  sleep $d; kill -INT $pid 2>/dev/null && [ -n "$n" ] && r=reading; n=""; wait $pid; rc=$?
  echo "rc=$rc$r"
  if [ -e %s/err ]; then cat %s/err; else echo "(not started)"; fi
done
]]):format(dir, H.lua, H.root, big, dir, dir, dir))
    local out = H.sh("sh " .. script .. " 2>&1")
    assert.is_nil(out:find("traceback", 1, true), out)
    assert.is_nil(out:find("interrupted!", 1, true), out)
    local interrupted, runs = 0, {}    -- each run: its rc line, then what it said up to the next rc line
    local rc, said, was
    for line in (out .. "rc=end\n"):gmatch("([^\n]*)\n") do
      local n, reading = line:match("^rc=(%d+)(%a*)$")
      if line == "rc=end" then n = "end" end
      if n then
        if rc then runs[#runs + 1] = { rc, said, was } end
        rc, said, was = n, "", reading
      elseif rc then
        said = said .. line .. "\n"
      end
    end
    assert.are.equal(10, #runs, out)
    for _, run in ipairs(runs) do
      local code, text, reading = run[1], run[2], run[3]
      -- told while it read the file (and still there to be told): it stops,
      -- whatever pcall the signal comes in (it once went on to the end)
      if reading == "reading" then assert.are.equal("130", code, out) end
      if text == "(not started)\n" then
        -- killed in sh's child before it opened err, so before lbatch was
        -- there to be told (run 31, at moment 0): nothing to say, not counted
        assert.are.equal("130", code, out)
      elseif code == "130" then
        interrupted = interrupted + 1
        assert.are.equal("\nlbatch: interrupted\n", text, out)
      else
        assert.are.equal("1", code, out)                       -- finished: the file is too large for the test model
      end
    end
    assert.is_true(interrupted >= 3, out)
  end)
end)

describe("lbatch top on a terminal of no rows", function()
  local function cpu_ticks(pid)
    local stat = H.read("/proc/" .. pid .. "/stat") or ""
    local utime, stime = stat:match("^%d+ %b() %S+" .. (" %S+"):rep(10) .. " (%d+) (%d+)")
    return (tonumber(utime) or 0) + (tonumber(stime) or 0)
  end

  it("draws nothing, idles, quits on q and on SIGTERM, and leaves the terminal as it found it", function()
    if not H.ok("command -v tmux >/dev/null 2>&1") then pending("no tmux") return end
    local emu = H.emulator({ speed = 200, rate_limits = false })
    local dir = H.tmpdir()
    -- (a tmux server of its own for each round: a new session asked of the
    -- server the last round just killed can reach it while it ends, and go)
    local sock
    local function tmux(a) return H.sh(("tmux -L %s %s 2>&1"):format(sock, a)) end
    local function lists()
      local r = emu.stats().routes
      return type(r) == "table" and r["GET /batches"] or 0
    end
    for _, how in ipairs({ "q", "TERM" }) do
      sock = ("lbatch-top0-%s-%d"):format(how, math.random(1, 1e9))
      os.remove(dir .. "/exit")
      local listed = lists()
      local cmd = ("stty rows 0 cols 80; stty -g > %s/before; env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s "
        .. "%s/bin/lbatch top --interval 1; echo exit=$? > %s/exit; stty -g > %s/after; sleep 60")
        :format(dir, emu.base, H.lua, H.root, dir, dir)
      tmux(("new-session -d -x 80 -y 30 %s"):format(H.q(cmd)))
      local pid
      local deadline = H.now() + 30   -- (a hang, not a slow machine)
      repeat
        H.sleep(0.2)
        local shell = tmux("list-panes -F '#{pane_pid}'"):match("%d+")
        -- (the shell's child that is lbatch top: not stty, which runs first)
        pid = shell and H.sh("pgrep -P " .. shell .. " -f 'bin/lbatch top'"):match("%d+")
      until pid or H.now() > deadline
      assert.is_truthy(pid, ("lbatch top did not start (round %s); its pane:\n%s"):format(how, tmux("capture-pane -p")))
      -- past its start: the view runs once it has read the list
      assert.is_true(H.await(function() return lists() > listed end, 20), "lbatch top read no list")
      local t0 = cpu_ticks(pid)
      H.sleep(1)
      local used = cpu_ticks(pid) - t0
      if how == "q" then tmux("send-keys q") else H.ok("kill -TERM " .. pid) end
      deadline = H.now() + 30
      -- (written whole: the shell makes the file before echo writes to it)
      while not (H.read(dir .. "/exit") or ""):find("\n") and H.now() < deadline do H.sleep(0.1) end
      local exit = H.read(dir .. "/exit")
      if not exit then H.ok("kill -9 " .. pid) end
      tmux("kill-server")
      assert.is_true(used < 50, ("%d ticks of CPU in a second"):format(used))   -- idle, not a spin
      assert.are.equal(how == "q" and "exit=0\n" or "exit=143\n", exit)
      assert.are.equal(H.read(dir .. "/before"), H.read(dir .. "/after"))       -- the terminal as it was
    end
    emu.stop()
  end)
end)

describe("LBATCH_NO_DUMP=1", function()
  -- a process of its own (the flag is the process's): dumpable before and
  -- after it makes a client, as prctl(PR_GET_DUMPABLE) says
  local function dumpable_around_client(env)
    local code = 'local core = require "lbatch.core"; local before = core.dumpable(); '
      .. 'local c = assert(require("lbatch").new({ api_key = "sk-secret-key-1234" })); '
      .. 'local during = core.dumpable(); c:close(); print(before, during, core.dumpable())'
    return H.sh(("cd %s && env %s LUA_PATH='./?.lua;./?/init.lua;;' %s -e %s 2>&1"):format(H.q(H.root), env, H.lua,
      H.q(code)))
  end

  it("makes the process that holds a key non-dumpable for the rest of its life; unset, nothing changes", function()
    assert.are.equal("true\tfalse\tfalse\n", dumpable_around_client("LBATCH_NO_DUMP=1"))
    assert.are.equal("true\ttrue\ttrue\n", dumpable_around_client("LBATCH_NO_DUMP="))
    assert.are.equal("true\ttrue\ttrue\n", dumpable_around_client("LBATCH_NO_DUMP=0"))
  end)
end)

describe("a run killed with kill -9 while it downloads", function()
  it("leaves a .part file that the resumed run removes", function()
    local emu = H.emulator({ speed = 200, rate_limits = false })
    local dir = H.tmpdir()
    local reqs = H.requests(dir .. "/r.jsonl", 5)
    -- the downloads' answers wait 30 s: the temp file is there, the bytes are not
    H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "/content$", delay = 30, times = 10 } })
    local pid = H.sh(("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch run %s --dir %s/d --poll 0.05 "
      .. ">/dev/null 2>&1 & echo $!"):format(emu.base, H.lua, H.root, reqs, dir)):match("%d+")
    local function parts() return H.sh(("ls -A %s/d 2>/dev/null | grep -c '\\.part-' || true"):format(H.q(dir))):match("%d+") end
    local deadline = H.now() + 20
    while parts() == "0" and H.now() < deadline do H.sleep(0.05) end
    H.ok("kill -9 " .. pid)
    assert.are.equal("1", parts())
    H.http("DELETE", emu.url .. "/_emulator/faults")
    local code, text = lbatch(emu, ("run %s --dir %s/d --poll 0.05"):format(reqs, dir))
    emu.stop()
    assert.are.equal(0, code, text)
    assert.are.equal("0", parts())
  end)
end)

describe("a flow whose values hold invalid UTF-8", function()
  it("writes its results as valid UTF-8 JSON, the bad bytes as U+FFFD, and counts the items repaired", function()
    local emu = H.emulator({ speed = 200, rate_limits = false })
    local dir = H.tmpdir()
    H.write(dir .. "/items.csv", "id,question\na,What is 1 + 1?\nb,What is 2 + 2?\nc,What is 3 + 3?\n")
    H.write(dir .. "/bytes.lua", [[
return {
  key = function(item) return item.id end,
  step = function(item, ask)
    local a = assert(ask{ model = "qwen-plus", prompt = item.question })
    return { answer = a.content, raw = item.id ~= "b" and "caf\233 \255" or "fine" }
  end,
}
]])
    local code, text, stdout = lbatch(emu, ("flow %s/bytes.lua --items %s/items.csv --dir %s/f --poll 0.05 --json")
      :format(dir, dir, dir))
    emu.stop()
    assert.are.equal(0, code, text)
    local r = require("cjson").decode(stdout)
    assert.are.equal(2, r.repaired)
    local body = H.read(dir .. "/f/results.jsonl")
    assert.is_nil(require("lbatch.core").utf8_check(body))
    assert.are.equal(2, select(2, body:gsub("caf\239\191\189 \239\191\189", "")))
  end)
end)
