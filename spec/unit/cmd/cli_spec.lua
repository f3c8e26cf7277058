-- The lbatch command against the emulator, as a user runs it.
local H = require "helper"
local cjson = require "cjson"

-- the command's exit code, its stdout and stderr together, and its stdout
local function lbatch(emu, args)
  local code, out, err = H.lbatch(args, { emu = emu })
  return code, out .. err, out
end

-- the JSON a --json command printed on stdout
local function json_of(code, _, out)
  assert(code, "no exit code")
  return cjson.decode(out)
end

describe("the lbatch command", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  it("has --help for every command and exits 2 on wrong usage", function()
    local code, text = lbatch(nil, "--help")
    assert.are.equal(0, code)
    for _, c in ipairs({ "run", "submit", "status", "list", "cancel", "download", "validate", "estimate", "results",
                        "csv2jsonl" }) do
      assert.matches("\n  " .. c .. " ", text)
      local cc, help = lbatch(nil, c .. " --help")
      assert.are.equal(0, cc, c)
      assert.matches("Usage: lbatch " .. c, help)
    end
    assert.are.equal(2, (lbatch(nil, "")))
    assert.are.equal(2, (lbatch(nil, "frobnicate")))
    assert.are.equal(2, (lbatch(nil, "status")))
    assert.are.equal(2, (lbatch(nil, "list --limit")))
    code, text = lbatch(nil, "list --stauts completed")                -- a typo is not ignored
    assert.are.equal(2, code)
    assert.matches("unknown option %-%-stauts", text)
    assert.are.equal(2, (lbatch(nil, "status b --bogus=1")))
    code, text = lbatch(nil, "run questions.csv")
    assert.are.equal(2, code)
    assert.matches("%-%-model is required for a CSV", text)
  end)

  it("validates a file: problems with line numbers, exit 1", function()
    local good = H.requests(dir .. "/good.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus" })
    local code, text = lbatch(nil, "validate " .. good)
    assert.are.equal(0, code, text)
    assert.matches("3 lines", text)
    local bad = H.write(dir .. "/bad.jsonl", H.read(good) .. "{oops\n")
    code, text = lbatch(nil, "validate " .. bad)
    assert.are.equal(1, code)
    assert.matches("bad.jsonl:4: invalid_json_line", text)
    code, text = lbatch(nil, "validate --json " .. bad)
    assert.are.equal(1, code)
    assert.are.equal("invalid_json_line", cjson.decode(text).problems[1].code)
  end)

  it("validate prints a region's warnings on stderr, in --json too, and exits 0", function()
    local f = H.requests(dir .. "/intl.jsonl", 2, { url = "/v1/chat/completions", model = "qwen3-max" })
    local code, text, stdout = lbatch(nil, "validate --region intl " .. f)
    assert.are.equal(0, code, text)
    assert.are.equal(1, select(2, text:gsub("warning: unknown_model", "")), text)   -- once per model
    assert.matches(f .. ":1: warning: unknown_model The model \"qwen3-max\" is not in the intl region's", text, 1, true)
    assert.matches("(qwen3.7-plus, qwen-max, qwen-plus, qwen-flash, qwen-turbo)", text, 1, true)
    assert.is_nil(stdout:find("warning:", 1, true))                                   -- stderr only
    assert.matches("0 problem(s), 1 warning(s)", stdout, 1, true)
    code, text, stdout = lbatch(nil, "validate --json --region intl " .. f)
    assert.are.equal(0, code, text)
    local rep = cjson.decode(stdout)
    assert.are.same({ "unknown_model", 1, "body.model" }, { rep.warnings[1].code, rep.warnings[1].line, rep.warnings[1].param })
    assert.are.equal("[]", stdout:match('"problems":(%b[])'))
    -- the cn region lists qwen3-max; no region, no list
    for _, args in ipairs({ "--region cn ", "" }) do
      code, text = lbatch(nil, "validate " .. args .. f)
      assert.are.equal(0, code, text)
      assert.is_nil(text:find("warning:", 1, true), text)
    end
    -- a warning beside a problem: the problem sets the exit code
    local both = H.write(dir .. "/intl-bad.jsonl", H.read(f) .. "{oops\n")
    code, text = lbatch(nil, "validate --region intl " .. both)
    assert.are.equal(1, code, text)
    assert.matches("warning: unknown_model", text, 1, true)
    assert.are.equal(2, (lbatch(nil, "validate --limits loose " .. f)))
    assert.are.equal(2, (lbatch(nil, "validate --region mars " .. f)))
  end)

  it("--limits dashscope-strict fails a 2 MB line in validate, csv2jsonl and run", function()
    local big = string.rep("x", 2 * 1024 * 1024)
    local f = H.requests(dir .. "/big.jsonl", 1, { url = "/v1/chat/completions", model = "qwen-plus",
                                                   content = function() return big end })
    local code, text = lbatch(nil, "validate " .. f)                        -- 6 MB lines by default
    assert.are.equal(0, code, text)
    code, text = lbatch(nil, "validate --limits dashscope-strict " .. f)
    assert.are.equal(1, code, text)
    assert.matches(f .. ":1: line_too_large The line is larger than 1048576 bytes.", text, 1, true)
    local questions = H.write(dir .. "/big.csv", "id,q\na," .. big .. "\n")
    code, text = lbatch(nil, ("csv2jsonl %s %s/big-ok.jsonl --model qwen-plus"):format(questions, dir))
    assert.are.equal(0, code, text)
    assert.is_true(#H.read(dir .. "/big-ok.jsonl") > 2 * 1024 * 1024)
    code, text = lbatch(nil, ("csv2jsonl %s %s/big-strict.jsonl --model qwen-plus --limits dashscope-strict")
      :format(questions, dir))
    assert.are.equal(1, code, text)
    assert.matches("line_too_large: custom_id \"a\": The line is larger than 1048576 bytes.", text, 1, true)
    assert.is_nil((H.read(dir .. "/big-strict.jsonl") or ""):find("xxx", 1, true))   -- the line was not written
    -- run: the shards are written to the same rules, so nothing goes out
    local function uploads()
      local _, st = H.json("GET", emu.url .. "/_emulator/stats")
      return type(st.routes) == "table" and st.routes["POST /files"] or 0
    end
    local before = uploads()
    code, text = lbatch(emu, ("run %s --dir %s/big-run --limits dashscope-strict"):format(f, dir))
    assert.are.equal(1, code, text)
    assert.matches("line_too_large", text, 1, true)
    assert.matches("dashscope-strict", text, 1, true)
    assert.are.equal(before, uploads())
    code, text = lbatch(emu, ("run %s --model qwen-plus --dir %s/big-csv-run --limits dashscope-strict"):format(questions, dir))
    assert.are.equal(1, code, text)
    assert.matches("line_too_large", text, 1, true)
    assert.are.equal(2, (lbatch(nil, ("csv2jsonl %s %s/x.jsonl --model qwen-plus --limits loose"):format(questions, dir))))
  end)

  it("submits, waits, downloads and reads results; lists and cancels", function()
    local input = H.requests(dir .. "/in.jsonl", 4, { url = "/v1/chat/completions", model = "qwen-plus",
      content = function(i) return i == 2 and "lbatch-emulator:fail" or ("q" .. i) end })
    local code, text, stdout = lbatch(emu, "submit --json --meta ds_name=cli " .. input)
    assert.are.equal(0, code, text)
    local b = cjson.decode(stdout)
    assert.matches("upload .*in.jsonl: .* B of .* %(100%%%)", text)     -- the upload's progress (stderr)
    assert.is_nil(text:match("%(100%%%)[^\n]*left"), text)              -- nothing is left at 100%
    assert.are.same({ "validating", "cli" }, { b.status, b.metadata.ds_name })
    code, text = lbatch(emu, "status --wait --poll 0.05 --json " .. b.id)
    assert.are.equal(0, code, text)
    local done = cjson.decode(text:match("{.*}"))
    assert.are.equal("completed", done.status)
    code, text = lbatch(emu, ("download %s --output %s/out.jsonl --errors %s/err.jsonl"):format(b.id, dir, dir))
    assert.are.equal(0, code, text)
    assert.is_true(H.exists(dir .. "/out.jsonl") and H.exists(dir .. "/err.jsonl"))
    code, text = lbatch(nil, ("results %s/out.jsonl --errors %s/err.jsonl --inputs %s --csv %s/r.csv --bom")
      :format(dir, dir, input, dir))
    assert.are.equal(0, code, text)
    assert.matches("3 ok, 1 failed, 0 missing", text)
    assert.are.equal("\239\187\191custom_id", H.read(dir .. "/r.csv"):sub(1, 12))
    code, text = lbatch(emu, "list --json --limit 5")
    assert.are.equal(0, code)
    assert.are.equal(b.id, cjson.decode(text)[1].id)
    code, text = lbatch(emu, "list")
    assert.are.equal(0, code)
    assert.matches(b.id, text, 1, true)
    assert.matches("\n1 batch%(es%)\n$", text)
    local slow = json_of(lbatch(emu, "submit --json --meta emulator_line_seconds=1000 " .. input))
    code, text = lbatch(emu, "cancel " .. slow.id)
    assert.are.equal(0, code, text)
    assert.matches("cancelling", text)
    code, text = lbatch(emu, "list --limit 1")                 -- two batches now: the newest, and a hint
    assert.are.equal(0, code)
    assert.matches(slow.id, text, 1, true)
    assert.matches("\n1 batch%(es%); more with %-%-all", text)
    code = lbatch(emu, "status --wait --poll 0.05 " .. slow.id)
    assert.are.equal(3, code)                    -- ended cancelled
    code, text = lbatch(emu, "status batch_nope")
    assert.are.equal(1, code)
    assert.matches("404", text)
  end)

  it("runs a CSV end to end and resumes on the same directory", function()
    local questions = H.write(dir .. "/q.csv", 'id,question\na,"one, two"\nb,"say ""hi"""\nc,中文\n')
    local code, text = lbatch(emu, ("run %s --model qwen-plus --dir %s/work --output %s/answers.csv --poll 0.05 --max-lines 2")
      :format(questions, dir, dir))
    assert.are.equal(0, code, text)
    assert.matches("3 requests, 3 ok, 0 failed, 0 missing", text)
    assert.matches(questions .. ": the first row was taken as a header and skipped: id,question (--no-header sends it)\n",
                   text, 1, true)
    assert.matches("\njobs: ", text)               -- progress lines (not a terminal)
    assert.is_nil(text:find("\r\27[K", 1, true))
    local rows = {}
    for row in require("lbatch.csv").rows(dir .. "/answers.csv") do rows[#rows + 1] = row end
    assert.are.equal(4, #rows)
    assert.are.equal("one, two", rows[2][8]:match("qwen%-plus%): (.*)$"))
    local _, st = H.json("GET", emu.url .. "/_emulator/stats")
    code = lbatch(emu, ("run %s --model qwen-plus --dir %s/work --output %s/again.csv"):format(questions, dir, dir))
    assert.are.equal(0, code)
    local _, st2 = H.json("GET", emu.url .. "/_emulator/stats")
    assert.are.equal(st.routes["POST /files"], st2.routes["POST /files"])   -- nothing sent again
  end)

  it("runs every row of a CSV without a header, the first one too", function()
    local questions = H.write(dir .. "/bare-run.csv", "q1,What is 2 + 2?\nq2,Name a prime.\n")
    local code, text = lbatch(emu, ("run %s --model qwen-plus --dir %s/bare-run --output %s/bare-run.csv --poll 0.05")
      :format(questions, dir, dir))
    assert.are.equal(0, code, text)
    assert.matches("2 requests, 2 ok, 0 failed, 0 missing", text)
    assert.is_nil(text:find("header", 1, true), text)
  end)

  it("draws one live progress line on a terminal", function()
    local input = H.requests(dir .. "/tty.jsonl", 4, { url = "/v1/chat/completions", model = "qwen-plus" })
    -- script(1) runs the command on a pseudo-terminal
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch run %s --dir %s/tty --output %s/tty.csv --poll 0.05 --max-lines 1")
      :format(emu.base, H.lua, H.root, input, dir, dir)
    local text = H.sh(("script -qec %q /dev/null"):format(cmd))
    local redraws = select(2, text:gsub("\r\27%[K", ""))
    assert.is_true(redraws >= 2, text)            -- the line is redrawn in place
    assert.matches("\r\27%[Kjobs: [^\r\n]*4 completed | requests 4/4 done", text)
    assert.matches("4 requests, 4 ok, 0 failed, 0 missing", text)
    assert.is_nil(text:find("\njobs: "), text)     -- never a plain progress line
  end)

  it("turns a CSV into request files", function()
    local questions = H.write(dir .. "/c.csv", "id,text\nx,hello\ny,world\n")
    local code, text, stdout = lbatch(nil, ("csv2jsonl %s %s/c.jsonl --model qwen-plus"):format(questions, dir))
    assert.are.equal(0, code, text)
    assert.matches("2 lines", text)
    -- the header is skipped, and said in one line
    assert.are.equal(1, select(2, stdout:gsub("as a header", "")), stdout)
    assert.matches(questions .. ": the first row was taken as a header and skipped: id,text (--no-header sends it)\n",
                   stdout, 1, true)
    assert.is_true(require("lbatch.jsonl").validate(dir .. "/c.jsonl").ok)
    assert.are.equal(2, (lbatch(nil, ("csv2jsonl %s %s/d.jsonl"):format(questions, dir))))
    -- --json: the manifest says it, the line goes to stderr
    code, text, stdout = lbatch(nil, ("csv2jsonl %s %s/c.jsonl --model qwen-plus --json"):format(questions, dir))
    assert.are.equal(0, code, text)
    local m = cjson.decode(stdout)
    assert.are.same({ true, { "id", "text" }, 2 }, { m.skipped_header, m.header, m.lines })
    assert.matches("taken as a header", text, 1, true)
    -- no header: every row is a request, nothing said
    local bare = H.write(dir .. "/bare.csv", "x,hello\ny,world\n")
    code, text = lbatch(nil, ("csv2jsonl %s %s/b.jsonl --model qwen-plus"):format(bare, dir))
    assert.are.equal(0, code, text)
    assert.matches("2 lines", text)
    assert.is_nil(text:find("header", 1, true), text)
    assert.matches('"custom_id":"x"', H.read(dir .. "/b.jsonl"))
    -- --no-header: the first row is a request whatever it holds
    code, text = lbatch(nil, ("csv2jsonl %s %s/e.jsonl --model qwen-plus --no-header"):format(questions, dir))
    assert.are.equal(0, code, text)
    assert.matches("3 lines", text)
    assert.matches('"custom_id":"id"', H.read(dir .. "/e.jsonl"))
    -- --header: the first row is skipped whatever it holds, and said
    code, text = lbatch(nil, ("csv2jsonl %s %s/f.jsonl --model qwen-plus --header"):format(bare, dir))
    assert.are.equal(0, code, text)
    assert.matches("1 lines", text)
    assert.matches(bare .. ": the first row was skipped as a header (--header): x,hello\n", text, 1, true)
    code, text = lbatch(nil, ("csv2jsonl %s %s/g.jsonl --model qwen-plus --header --no-header"):format(bare, dir))
    assert.are.equal(2, code, text)
    assert.matches("--header and --no-header exclude each other", text, 1, true)
  end)

  it("lists, deletes and prunes files, saying how much space that freed", function()
    local ids = {}
    for i = 1, 3 do
      local f = H.requests(dir .. "/keep" .. i .. ".jsonl", i, { url = "/v1/chat/completions", model = "qwen-plus" })
      local _, body = H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. f } })
      ids[i] = body.id
    end
    local code, text, stdout = lbatch(emu, "files --json --all")
    assert.are.equal(0, code, text)
    local listed = {}
    for _, f in ipairs(cjson.decode(stdout)) do listed[f.id] = f end
    for _, id in ipairs(ids) do assert.is_table(listed[id], id) end
    code, text = lbatch(emu, "files")
    assert.are.equal(0, code, text)
    assert.matches(ids[3]:gsub("%p", "%%%0") .. "  batch%s+%d+ B%s+%d+m  keep3.jsonl", text)   -- size and age
    assert.is_true(text:find(ids[3], 1, true) < text:find(ids[1], 1, true))
    code, text = lbatch(emu, "rm " .. ids[1])
    assert.are.equal(0, code, text)
    assert.are.equal(404, (H.json("GET", emu.base .. "/files/" .. ids[1])))
    assert.are.equal(1, (lbatch(emu, "rm file-batch-nope")))
    -- (created_at is in whole seconds): the second after the newest file's
    local _, newest = H.json("GET", emu.base .. "/files/" .. ids[3])
    assert.is_true(H.await(function() return os.time() - 1 > newest.created_at end, 5, 0.05))
    code, text = lbatch(emu, "prune --older-than 1s --dry-run")
    assert.are.equal(0, code, text)
    assert.matches("would delete " .. ids[2], text, 1, true)
    assert.matches("would free %d+ file%(s%), [%d.]+ k?B", text)
    assert.are.equal(200, (H.json("GET", emu.base .. "/files/" .. ids[2])))      -- still there
    code, text, stdout = lbatch(emu, "prune --older-than 1s --json")
    assert.are.equal(0, code, text)
    local report = cjson.decode(stdout)
    assert.is_true(report.bytes > 0)
    assert.are.equal(404, (H.json("GET", emu.base .. "/files/" .. ids[2])))
    assert.are.equal(404, (H.json("GET", emu.base .. "/files/" .. ids[3])))
    assert.are.equal(2, (lbatch(emu, "prune")))                                  -- --older-than is required
    assert.are.equal(2, (lbatch(emu, "prune --older-than soon")))
  end)

  it("shows a download's bytes, rate and time left on a terminal", function()
    local input = H.requests(dir .. "/prog.jsonl", 2000, { url = "/v1/chat/completions", model = "qwen-plus" })
    -- (the emulator's lines at 1 ms of service time each: 2000 lines end in a moment)
    local b = cjson.decode(select(3, lbatch(emu, "submit --json --meta emulator_line_seconds=0.001 " .. input)))
    assert.are.equal(0, (lbatch(emu, "status --wait --poll 0.05 " .. b.id)))
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch download %s --output %s/prog.out")
      :format(emu.base, H.lua, H.root, b.id, dir)
    local text = H.sh(("script -qec %q /dev/null"):format(cmd))
    assert.matches("\r\27%[Kdownload [^\r]*prog%.out: [%d.]+ [kM]?B of [%d.]+ [kM]?B %(100%%%), [%d.]+ [kMG]?B/s", text)
    assert.matches("output  " .. dir .. "/prog.out", text, 1, true)
  end)

  it("removes its partial download when interrupted (SIGINT), and exits 130", function()
    local input = H.requests(dir .. "/int.jsonl", 3, { url = "/v1/chat/completions", model = "qwen-plus" })
    local b = cjson.decode(select(3, lbatch(emu, "submit --json " .. input)))
    assert.are.equal(0, (lbatch(emu, "status --wait --poll 0.05 " .. b.id)))
    H.mkdir(dir .. "/int")
    H.json("POST", emu.url .. "/_emulator/faults", { json = { path = "/content$", delay = 30 } })
    local pidfile = dir .. "/int.pid"
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch download %s --output %s/int/out.jsonl")
      :format(emu.base, H.lua, H.root, b.id, dir)
    H.ok(("(%s >/dev/null 2>&1 & echo $! > %s; wait $!; echo \"exit=$?\" > %s.rc) &"):format(cmd, pidfile, pidfile))
    local partial = ""
    H.await(function()                      -- the temp file is made before the request goes out
      partial = H.sh("ls " .. dir .. "/int")
      return partial:find("part-", 1, true)
    end, 30)
    assert.matches("out.jsonl.part-", partial)
    H.ok("kill -INT $(cat " .. pidfile .. ")")
    local rc = H.await(function()   -- (written whole: the shell makes the file before echo writes)
      local s = H.read(pidfile .. ".rc") return s and s:find("\n") and s end, 30)   -- (the answer is held 30 s)
    H.http("DELETE", emu.url .. "/_emulator/faults")
    assert.matches("exit=130", rc or "")
    assert.are.equal("", H.sh("ls -A " .. dir .. "/int"))
  end)
end)

describe("lbatch run --notify-listen", function()
  local SECRET = "whsec_" .. require("lbatch.core").base64("the secret of the command's listener")

  it("is told by the emulator's webhooks: the run ends in seconds, about one status call a job", function()
    local port = H.free_port()
    local emu = H.emulator({ speed = 200, dialect = "openai", tls = false, rate_limits = false,
      webhook_url = ("http://127.0.0.1:%d/hook"):format(port), webhook_secret = SECRET })
    local dir = H.tmpdir()
    local input = H.requests(dir .. "/in.jsonl", 12, { url = "/v1/chat/completions", model = "gpt-4o-mini" })
    local t0 = H.now()
    -- through the shell script: it picks a Lua with lua-http for --notify-listen
    local out = H.sh(("env OPENAI_API_KEY=k LBATCH_BASE_URL=%s OPENAI_WEBHOOK_SECRET=%s %s/bin/lbatch run %s "
      .. "--dir %s/run --region openai --max-lines 2 --poll 300 --notify-listen 127.0.0.1:%d --json 2>%s/err; "
      .. "echo \"exit=$?\""):format(emu.base, SECRET, H.root, input, dir, port, dir))
    local wall = H.now() - t0
    local routes = emu.stats().routes
    emu.stop()
    local err = H.read(dir .. "/err") or ""
    assert.matches("exit=0", out, nil, nil, err)
    assert.truthy(err:find("listening for notices on 127.0.0.1:" .. port, 1, true), err)
    local rep = cjson.decode(out:match("^[^\n]*"))
    assert.are.same({ 12, 12, 6 }, { rep.total, rep.ok, rep.shards })
    -- not woken, a wait would poll first after --poll's 300 s: only that (or a hang) takes 120
    assert.is_true(wall < 120, ("%.1f s: the waits were not woken"):format(wall))
    local calls = (routes["GET /batches"] or 0) + (routes["GET /batches/{id}"] or 0)
    assert.is_true(calls <= 6 + 2, ("%d status calls for 6 jobs"):format(calls))
    H.ok("rm -rf " .. dir)
  end)

  it("refuses --notify-url without --notify-listen, and a secret that is not whsec_", function()
    local code, text = lbatch(nil, "run x.jsonl --notify-url https://example.com/hook")
    assert.are.equal(2, code)
    assert.matches("%-%-notify%-url needs %-%-notify%-listen", text)
    local out = H.sh(("env OPENAI_WEBHOOK_SECRET=whsec_!! DASHSCOPE_API_KEY=k %s %s/bin/lbatch run x.jsonl "
      .. "--notify-listen 127.0.0.1:1 2>&1; echo \"exit=$?\""):format(H.lua, H.root))
    assert.matches("OPENAI_WEBHOOK_SECRET", out)
    assert.matches("exit=2", out)
  end)
end)

describe("the lbatch command from a checkout and installed", function()
  local emu
  setup(function() emu = H.emulator({ speed = 200, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  local function clean(cmd)   -- an empty environment: nothing set by hand (but the TLS pass's CA)
    local ca = emu.tls and ("SSL_CERT_FILE=" .. emu.tls .. " ") or ""
    return H.sh(("cd /tmp && env -i PATH=%s DASHSCOPE_API_KEY=k %s%s 2>&1; echo \"exit=$?\""):format(os.getenv("PATH"), ca, cmd))
  end

  it("runs as bin/lbatch and as `lua bin/lbatch` with an empty environment", function()
    local out = clean(H.root .. "/bin/lbatch --help")
    assert.matches("Usage: lbatch COMMAND", out)
    assert.matches("exit=0", out)
    out = clean(("%s %s/bin/lbatch list --base-url %s"):format(H.lua, H.root, emu.base))
    assert.matches("exit=0", out)
  end)

  it("runs after make install into a scratch prefix #install", function()
    local prefix, tree = H.tmpdir(), H.scratch_checkout()   -- (luarocks make compiles in the tree)
    local built = H.sh(("cd %s && make -s install PREFIX=%s >/dev/null 2>&1; echo $?"):format(tree, prefix))
    assert.are.equal("0\n", built)
    local out = clean(prefix .. "/bin/lbatch --help")
    assert.matches("Usage: lbatch COMMAND", out)
    out = clean(("%s/bin/lbatch list --base-url %s"):format(prefix, emu.base))
    assert.matches("exit=0", out)
    H.ok("rm -rf " .. prefix .. " " .. tree)
  end)
end)

describe("lbatch flow", function()
  local emu
  setup(function() emu = H.emulator({ speed = 2000, rate_limits = false }) end)   -- (the flow's asks, not its pace)
  teardown(function() emu.stop() end)

  it("runs a flow file over a CSV of items, and again on its dir without asking anything twice", function()
    local dir = H.tmpdir()
    H.write(dir .. "/flow.csv", "id,question\nf1,What is 1 + 1?\nf2,What is 2 + 2?\nf3,What is 3 + 3?\n")
    local script = H.root .. "/spec/fixtures/judge_flow.lua"
    local args = ("flow %s --items %s/flow.csv --dir %s/flow --poll 0.05 --json"):format(script, dir, dir)
    local _, st = H.json("GET", emu.url .. "/_emulator/stats")
    local before = st.routes ~= cjson.null and st.routes["POST /batches"] or 0
    local code, text, stdout = lbatch(emu, args)
    assert.are.equal(0, code, text)
    local r = cjson.decode(stdout)
    assert.are.same({ 3, 3, 0 }, { r.items, r.done, r.failed })
    assert.is_true(r.asks >= 6 and r.batches >= 2, stdout)
    local rows = {}
    for line in H.read(r.output):gmatch("[^\n]+") do rows[#rows + 1] = cjson.decode(line) end
    assert.are.same({ "f1", "f2", "f3" }, { rows[1].key, rows[2].key, rows[3].key })
    assert.is_number(rows[1].value.score)
    code, text, stdout = lbatch(emu, args)
    assert.are.equal(0, code, text)
    assert.are.same(r, cjson.decode(stdout))
    _, st = H.json("GET", emu.url .. "/_emulator/stats")
    assert.are.equal(before + r.batches, st.routes["POST /batches"])
    -- every round of at most 3 asks: all in real time, no batch
    code, text, stdout = lbatch(emu, ("flow %s --items %s/flow.csv --dir %s/rt --finish-realtime 3 --json")
      :format(script, dir, dir))
    assert.are.equal(0, code, text)
    local rt = cjson.decode(stdout)
    assert.are.same({ 3, r.asks, 0, r.asks }, { rt.done, rt.asks, rt.batches, rt.realtime })
    local _, st2 = H.json("GET", emu.url .. "/_emulator/stats")
    assert.are.equal(st.routes["POST /batches"], st2.routes["POST /batches"])
    assert.are.equal((st.routes["POST /chat/completions"] or 0) + r.asks, st2.routes["POST /chat/completions"])
    -- --flush: the shards' passes at their own pace, to the same results
    code, text, stdout = lbatch(emu, ("flow %s --items %s/flow.csv --dir %s/fl --flush 1,0.1 --max-lines 1 --poll 0.05 --json")
      :format(script, dir, dir))
    assert.are.equal(0, code, text)
    local fl = cjson.decode(stdout)
    assert.are.same({ 3, r.asks }, { fl.done, fl.asks })
    local frows = {}
    for line in H.read(fl.output):gmatch("[^\n]+") do frows[#frows + 1] = cjson.decode(line) end
    assert.are.same(rows, frows)
    assert.are.equal(2, (lbatch(emu, ("flow %s --items %s/flow.csv --dir %s/f3 --flush x"):format(script, dir, dir))))
    assert.are.equal(2, (lbatch(emu, "flow " .. script)))                       -- no --items
    code, text = lbatch(emu, ("flow %s/flow.csv --items %s/flow.csv --dir %s/f2"):format(dir, dir, dir))
    assert.are.equal(1, code, text)
    assert.matches("bad_script", text)
  end)

  it("stops on an ask the step changed since it was asked, unless --ask-again or the script's on_change says so", function()
    local dir = H.tmpdir()
    H.write(dir .. "/flow.csv", "id,question\nc1,What is 5 + 5?\nc2,What is 6 + 6?\n")
    local judge = H.root .. "/spec/fixtures/judge_flow.lua"
    local function script(name, body)
      local path = ("%s/%s.lua"):format(dir, name)
      H.write(path, ("local base = dofile(%q)\n"):format(judge) .. body)
      return path
    end
    -- a run that dies once its first answers are journaled: the items are half done
    local dies = script("dies", [[
return { key = base.key, step = function(item, ask)
  assert(ask{ model = "qwen-plus", prompt = item.question })
  os.exit(9)
end }]])
    -- the judge's flow, its first ask worded anew; on_change from the script
    local function changed(name, on_change)
      return script(name, ([[
return { key = base.key, on_change = %s, step = function(item, ask)
  return base.step({ id = item.id, question = "Now: " .. item.question }, ask)
end }]]):format(on_change and ("%q"):format(on_change) or "nil"))
    end
    local function flow(path, work, extra)
      return lbatch(emu, ("flow %s --items %s/flow.csv --dir %s/%s --poll 0.05 --json%s")
        :format(path, dir, dir, work, extra or ""))
    end
    for _, work in ipairs({ "a", "b", "c" }) do
      local code, text = flow(dies, work)
      assert.are.equal(9, code, text)
    end
    local plain = changed("plain")
    local code, text = flow(plain, "a")
    assert.are.equal(1, code, text)
    assert.matches("flow_changed", text)
    code, text = flow(plain, "b", " --ask-again")
    assert.are.equal(0, code, text)
    code, text = flow(changed("told", "ask_again"), "c")
    assert.are.equal(0, code, text)
    local rows = {}
    for line in H.read(dir .. "/c/results.jsonl"):gmatch("[^\n]+") do rows[#rows + 1] = cjson.decode(line) end
    assert.matches("Now: What is 5 %+ 5%?", rows[1].value.answer)
  end)
end)

describe("the lbatch command's small things (issue 32)", function()
  local emu
  setup(function() emu = H.emulator({ speed = 400, rate_limits = false }) end)
  teardown(function() emu.stop() end)

  -- the command run in `cwd`: its exit code, stdout and stderr apart (stderr a file: not a terminal)
  local function cmd(cwd, args) return H.lbatch(args, { emu = emu, cwd = cwd }) end
  local function upload(path)
    local _, f = H.json("POST", emu.base .. "/files", { form = { "purpose=batch", "file=@" .. path } })
    return f.id
  end

  it("--version and -V print lbatch and the version", function()
    local want = "lbatch " .. require("lbatch.impl.transport.version") .. "\n"
    for _, flag in ipairs({ "--version", "-V" }) do
      local code, out = cmd(H.root, flag)
      assert.are.same({ 0, want }, { code, out })
    end
  end)

  it("rm says what failed with one prefix", function()
    local code, out, err = cmd(H.root, "rm file-nope")
    assert.are.equal(1, code)
    assert.matches("nothing deleted", out)
    assert.matches("^lbatch rm: http 404", err)
    assert.is_nil(err:find("lbatch: ", 1, true))
  end)

  it("download --output - writes the file to stdout, and no file named -", function()
    local dir = H.tmpdir()
    local path = H.requests(dir .. "/in.jsonl", 50, { url = "/v1/chat/completions", model = "qwen-plus" })
    local _, b = H.json("POST", emu.base .. "/batches", { json = { input_file_id = upload(path),
      endpoint = "/v1/chat/completions", completion_window = "24h" } })
    b = H.wait_final(emu, b.id)
    assert.are.equal("completed", b.status)
    local _, want = H.http("GET", emu.base .. "/files/" .. b.output_file_id .. "/content")
    assert.are.equal(50, select(2, want:gsub("\n", "")))
    local code, out, err = cmd(dir, "download " .. b.id .. " --output -")
    assert.are.equal(0, code, err)
    assert.are.equal(want, out)
    assert.is_false(H.exists(dir .. "/-"))
    assert.matches("output  %-", err)            -- what was written where: on stderr, stdout is the file
    code, out, err = cmd(dir, "download " .. b.output_file_id .. " --output - --json")
    assert.are.equal(0, code, err)
    assert.are.equal(want, out)
    assert.matches('"output":"-"', err, 1, true)
  end)

  it("off a terminal: plain progress lines, one a change, no byte counter of an unknown size", function()
    local dir = H.tmpdir()
    local path = H.requests(dir .. "/in.jsonl", 30, { url = "/v1/chat/completions", model = "qwen-plus" })
    local code, _, err = cmd(dir, "run in.jsonl --max-lines 10 --poll 0.1")
    assert.are.equal(0, code, err)
    assert.is_nil(err:find("moving", 1, true), err)
    assert.is_nil(err:find("\r", 1, true))
    local last
    for line in err:gmatch("[^\n]+") do
      local sig = line:match("^(jobs: .- | requests [^|]*)")
      if sig then
        assert.are_not.equal(last, sig, err)    -- a line when something changed, not a line a tick
        last = sig
      end
    end
    assert.matches("requests 30/30 done", last)
    assert.truthy(H.exists(path .. ".lbatch/results.jsonl"))
  end)

  it("top off a terminal prints its frame without the key help", function()
    local code, out = cmd(H.root, "top")
    assert.are.equal(0, code, out)
    assert.matches("lbatch top:", out)
    assert.matches("| filter all", out, 1, true)
    assert.is_nil(out:find("q quit", 1, true), out)
  end)

  it("run and flow on a missing input fail and leave no work directory behind", function()
    local dir = H.tmpdir()
    local code, _, err = cmd(dir, "run nope.csv --model qwen-plus")
    assert.are.equal(1, code)
    assert.matches("cannot read nope.csv", err)
    code, _, err = cmd(dir, "run nope.jsonl --dir work")
    assert.are.equal(1, code)
    assert.matches("cannot read nope.jsonl", err)
    code, _, err = cmd(dir, ("flow %s/spec/fixtures/judge_flow.lua --items nope.csv"):format(H.root))
    assert.are.equal(1, code)
    assert.matches("cannot read nope.csv", err)
    assert.are.equal("", H.sh("ls -A " .. H.q(dir)))
  end)
end)

describe("lbatch --workspace ID", function()
  local socket = require "socket"

  -- `lbatch ARGS` with only PATH, the key and https_proxy set, the proxy a
  -- listener here that records each CONNECT's host, answers 403 and
  -- connects nowhere: the exit code, stdout and stderr, the hosts asked for
  local function through_proxy(args)
    local srv = assert(socket.bind("127.0.0.1", H.free_port()))
    srv:settimeout(0.05)
    local _, port = srv:getsockname()
    local dir = H.tmpdir()
    H.sh(("cd /tmp && (env -i PATH=%s HOME=/tmp DASHSCOPE_API_KEY=sk-ws-secret https_proxy=http://127.0.0.1:%d "
      .. "%s %s/bin/lbatch %s >%s/out 2>%s/err; echo $? >%s/rc.tmp; mv %s/rc.tmp %s/rc) >/dev/null 2>&1 &")
      :format(H.q(os.getenv("PATH")), port, H.lua, H.root, args, dir, dir, dir, dir, dir))
    local hosts = {}
    assert(H.await(function()
      local c = srv:accept()
      if c then
        c:settimeout(5)
        local first, l
        repeat l = c:receive("*l") first = first or l until not l or l == ""
        hosts[#hosts + 1] = tostring(first):match("^CONNECT (%S+)") or tostring(first)
        c:send("HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        c:close()
      end
      return H.exists(dir .. "/rc")
    end, 120, 0), "lbatch did not end")
    srv:close()
    local code, out, err = tonumber(H.read(dir .. "/rc")), H.read(dir .. "/out"), H.read(dir .. "/err")
    H.rm_rf(dir)
    return code, out, err, hosts
  end

  it("sends the key to the workspace's domain in its region, and nowhere else", function()
    for region, host in pairs({ intl = "ws-7f3a.ap-southeast-1.maas.aliyuncs.com:443",
                                cn = "ws-7f3a.cn-beijing.maas.aliyuncs.com:443" }) do
      local code, out, err, hosts = through_proxy("list --workspace ws-7f3a --region " .. region)
      assert.are.equal(1, code, err)
      assert.is_true(#hosts >= 1, err)
      for _, h in ipairs(hosts) do assert.are.equal(host, h) end
      assert.is_nil((out .. err):find("sk-ws-secret", 1, true))
    end
  end)

  it("refuses a workspace without its region, or beside --base-url, sending nothing", function()
    for _, args in ipairs({ "list --workspace ws-7f3a", "list --workspace ws-7f3a --region intl --base-url http://127.0.0.1:9" }) do
      local code, out, err, hosts = through_proxy(args)
      assert.are.equal(1, code, err)
      assert.are.same({}, hosts)
      assert.matches(args:find("base") and "workspace and base_url both name a host" or "workspace needs region", err, 1, true)
      assert.is_nil((out .. err):find("sk-ws-secret", 1, true))
    end
    local _, help = H.lbatch("--help")
    assert.matches("--workspace ID", help, 1, true)
  end)
end)

describe("lbatch run's usage line", function()
  local emu
  setup(function() emu = H.emulator({ speed = 400, rate_limits = false, dialect = "openai" }) end)
  teardown(function() emu.stop() end)

  local function input(path, n)
    return H.requests(path, n, { line = function(i)
      return { custom_id = "u" .. i, method = "POST", url = "/v1/chat/completions", body = { model = "gpt-5-mini",
        max_tokens = 20, messages = { { role = "user", content = ("word "):rep(i * 3) } } } }
    end })
  end
  local function run(args)
    return H.lbatch("run --provider openai --limits openai --poll 0.05 " .. args,
      { env = ("OPENAI_API_KEY=k LBATCH_BASE_URL=%s"):format(emu.base) })
  end

  it("says when the batches' usage (the bill) and the lines' sum differ, and --json carries both", function()
    local dir = H.tmpdir()
    local code, out, err = run(("%s --dir %s/w --json"):format(input(dir .. "/in.jsonl", 4), dir))
    assert.are.equal(0, code, err)
    local first = cjson.decode(out)
    -- one run, every answer its batch's: they agree, nothing said
    assert.are.same({ "batch", false }, { first.usage_source, first.usage_differs }, out)
    assert.is_nil(first.lines_usage)
    assert.is_nil(err:find("usage", 1, true), err)
    -- run again with two rows added: the new batch bills the two; the lines hold all six answers
    code, out, err = run(("%s --dir %s/w --json"):format(input(dir .. "/in.jsonl", 6), dir))
    assert.are.equal(0, code, err)
    local again = cjson.decode(out)
    assert.are.same({ 6, "batch", true }, { again.ok, again.usage_source, again.usage_differs }, out)
    local l = again.lines_usage
    assert.is_true(l.prompt_tokens > again.prompt_tokens, out)
    assert.are.equal(again.prompt_tokens + again.completion_tokens, again.total_tokens)
    local said = ("lbatch run: the batches' usage, what the service bills and the tokens above, is %d in, %d out; "
      .. "the result lines sum to %d in, %d out\n"):format(again.prompt_tokens, again.completion_tokens,
      l.prompt_tokens, l.completion_tokens)
    assert.matches(said, err, 1, true)
    -- without --json: the same line once, beside the summary on stdout
    code, out, err = run(("%s --dir %s/w"):format(input(dir .. "/in.jsonl", 6), dir))
    assert.are.equal(0, code, err)
    assert.matches(("%d tokens"):format(again.total_tokens), out, 1, true)
    assert.are.equal(1, select(2, err:gsub("the result lines sum to", "")), err)
  end)

  it("lists every endpoint lbatch knows in --endpoint's help", function()
    local _, help = H.lbatch("run --help")
    local text = help:match("%-%-endpoint E(.-)\n  %-%-limits")
    for url in pairs(require("lbatch.impl.api.service").ENDPOINT_RULES) do
      assert.matches("[ ,]" .. url:gsub("%p", "%%%0") .. "[ ,\n]", text .. "\n")
    end
  end)
end)
