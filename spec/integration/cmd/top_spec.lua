-- `lbatch top` driven through a pseudo-terminal (tmux) against the
-- emulator with 300 jobs: its rows and totals on the captured screen, a
-- cancel (select, c, y) that reaches the service, and q that quits; and
-- `lbatch top --dir` on one pipeline run among them: only its jobs, a
-- shard not created yet, failures by code, tokens and cost.
local H = require "helper"
local lbatch = require "lbatch"

local JOBS = 300

describe("lbatch top", function()
  local emu, c, ids, dir, sock, run
  local function tmux(args) return H.sh(("tmux -L %s %s 2>&1"):format(sock, args)) end
  local function screen() return tmux("capture-pane -p") end
  -- the screen once it matches pattern (within seconds), settled: the same
  -- on a second look (a capture could land while tmux takes in a frame)
  local function until_shown(pattern, seconds)
    local deadline, s = H.now() + (seconds or 30)
    repeat
      s = screen()
      if s:find(pattern) then
        H.sleep(0.05)
        if screen() == s then return s end
      end
      H.sleep(0.1)
    until H.now() > deadline
    error(("not on the screen: %s\n%s"):format(pattern, s))
  end

  setup(function()
    assert(H.ok("command -v tmux >/dev/null"), "tmux is not installed (make deps)")
    emu = H.emulator({ speed = 200, tls = false, rate_limits = false })
    c = lbatch.new({ api_key = "k", base_url = emu.base })
    dir = H.tmpdir()
    local path = H.requests(dir .. "/r.jsonl", 20, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function(i) return i % 9 == 0 and "lbatch-emulator:fail" or "question " .. i end })
    -- one pipeline run of 3 shards (older than the 300 jobs: the rows below them), 3 of its 9
    -- requests failing
    local reqs = {}
    for i = 1, 9 do
      reqs[i] = { custom_id = "p" .. i, body = { model = "qwen-plus", messages = { { role = "user",
        content = i % 3 == 0 and "lbatch-emulator:fail" or "question " .. i } } } }
    end
    run = assert(require("lbatch.pipeline").run({ client = c, requests = reqs, dir = dir .. "/run", max_lines = 3,
      endpoint = "/v1/chat/completions", poll_interval = 0.1, poll_factor = 1 }))
    -- and a fourth shard the run has not created yet
    H.write(dir .. "/run/journal.jsonl", H.read(dir .. "/run/journal.jsonl") .. require("cjson").encode({ k = 4,
      shard = { k = 4, name = "later-4.jsonl", step = "written", lines = 3, round = 1, model = "qwen-plus" } }) .. "\n")
    H.write(dir .. "/prices.json", '{"qwen-plus": {"input": 2, "output": 8}}')
    local t = os.time()                           -- (ages are in whole seconds: the jobs a second later)
    assert(H.await(function() return os.time() > t end, 5, 0.02))
    local f = assert(c:upload(path))
    ids = {}
    for i = 1, JOBS do   -- most stay in progress for the test's length; some finish
      local slow = i % 10 == 0 and "0.5" or "400"
      ids[i] = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                                 metadata = { emulator_line_seconds = slow } })).id
    end
    sock = "lbatch-top-" .. math.random(1, 1e9)
  end)
  teardown(function()
    if sock then tmux("kill-server") end
    if c then c:close() end
    if emu then emu.stop() end
    if dir then H.rm_rf(dir) end
  end)

  it("shows rows and totals in 80 columns, cancels the selected job with c y, and quits on q", function()
    -- (refreshed every half second: the rate needs a refresh after the first)
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s LUA_PATH=%s LUA_CPATH=%s %s %s/bin/lbatch top --interval 0.5;"
      .. " echo exit=$? > %s/exit"):format(emu.base, H.q(os.getenv("LUA_PATH") or ""), H.q(os.getenv("LUA_CPATH") or ""),
      H.lua, H.root, dir)
    tmux(("new-session -d -x 80 -y 30 -c %s %s"):format(H.q(H.root), H.q(cmd)))
    until_shown("lbatch top: 303 jobs")   -- and the run's 3
    local s = until_shown("requests: %d+/6009 done", 60)   -- every job past validating (and the run's 9)
    assert.matches("lbatch top: 303 jobs", s, 1, true)      -- no job more (a failure shows the screen)
    -- the totals: jobs by status, requests done and failed, the rate
    assert.matches("requests: %d+/6009 done, %d+ failed, [%d.]+/s", s)
    assert.matches("failures: %d+ in error files", s)        -- (only a run's are read)
    -- the rows: as many as the screen holds, each with status, bar, counts, age and eta
    local rows = 0
    for line in s:gmatch("[^\n]+") do
      assert.is_true(#line <= 80, line)
      if line:find("^[ >]batch_") then
        rows = rows + 1
        assert.matches("^[ >]batch_%S+ %l[%l_]* +[#x.]+ +%d+/20 +%d+ +%S+ +%S+$", line, nil, nil,
          "a row unlike the others, on this screen:\n" .. s)
      end
    end
    assert.equals(30 - 6, rows)
    -- a refresh later the rate is seen
    until_shown("[1-9][%d.]*/s")
    -- select the third row (j, then Down), or the first in progress below it (one that
    -- finished cannot be cancelled), and cancel it
    local function selected_row()
      local rows_now = {}
      for line in screen():gmatch("[^\n]+") do if line:find("^[ >]batch_") then rows_now[#rows_now + 1] = line end end
      for i, line in ipairs(rows_now) do if line:sub(1, 1) == ">" then return i, line end end
    end
    local function move(key, want)
      tmux("send-keys " .. key)
      local deadline, at, line = H.now() + 30
      repeat
        at, line = selected_row()
        if at == want then return line end
        H.sleep(0.1)
      until H.now() > deadline
      error(("row %s selected, not %d"):format(tostring(at), want))
    end
    move("j", 2)
    local sel = move("Down", 3)
    for n = 4, 20 do
      if sel:find(" in_progress ", 1, true) then break end
      sel = move("Down", n)
    end
    local prefix = sel:match("^>(batch_%S+)")
    local id
    for _, x in ipairs(ids) do if x:sub(1, #prefix) == prefix then id = x end end
    assert.is_truthy(id, prefix)
    tmux("send-keys c")
    until_shown("cancel " .. id:gsub("%-", "%%-") .. "%? y to confirm")
    tmux("send-keys y")
    until_shown("cancel " .. id:gsub("%-", "%%-") .. ": cancel")
    local b = assert(c:retrieve(id))
    assert.is_truthy(b.status == "cancelling" or b.status == "cancelled", b.status)
    -- sort and filter change the view
    tmux("send-keys s")
    until_shown("sort status")
    tmux("send-keys f")
    until_shown("filter %l")
    tmux("send-keys q")
    local deadline = H.now() + 30   -- (a hang, not a slow machine)
    -- (written whole: the shell makes the file before echo writes to it)
    while not (H.read(dir .. "/exit") or ""):find("\n") and H.now() < deadline do H.sleep(0.1) end
    assert.equals("exit=0\n", H.read(dir .. "/exit"))
  end)

  it("--dir: one run's jobs from its journal, a shard not created yet, failures by code, tokens and cost", function()
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s LUA_PATH=%s LUA_CPATH=%s %s %s/bin/lbatch top --interval 1"
      .. " --dir %s/run --prices %s/prices.json; echo exit=$? > %s/exit2"):format(emu.base, H.q(os.getenv("LUA_PATH") or ""),
      H.q(os.getenv("LUA_CPATH") or ""), H.lua, H.root, dir, dir, dir)
    tmux(("new-session -d -x 100 -y 20 -c %s %s"):format(H.q(H.root), H.q(cmd)))
    local runid = run.shards[1].name:match("^(.-)%-1%.jsonl$")
    local s = until_shown("lbatch top: 4 jobs")
    assert.matches("lbatch top: 4 jobs %(3 completed, 1 written%) | run " .. runid, s)
    assert.matches("requests: 6/12 done, 3 failed", s)
    assert.matches("failures: 3 emulated_failure\n", s)
    assert.matches("tokens %d+, cost 0%.%d+", s)
    local batches, later = 0, 0
    for line in s:gmatch("[^\n]+") do
      if line:find("^[ >]batch_") then batches = batches + 1 end
      if line:find("^[ >]later%-4%.jsonl +written ") then later = later + 1 end
    end
    assert.are.same({ 3, 1 }, { batches, later })
    tmux("send-keys q")
    local deadline = H.now() + 30   -- (a hang, not a slow machine)
    -- (written whole: the shell makes the file before echo writes to it)
    while not (H.read(dir .. "/exit2") or ""):find("\n") and H.now() < deadline do H.sleep(0.1) end
    assert.equals("exit=0\n", H.read(dir .. "/exit2"))
  end)
end)
