-- The README and the guides, run. Every ```lua block is taken from README.md
-- and docs/*.md themselves, so the text and the code cannot drift, and run
-- in a fresh Lua (the suite's: lua5.4 or luajit) with an empty environment
-- but lbatch's paths, a key and the emulator's URL, in a directory holding
-- the files the snippets name. As the README says, snippets after its first
-- go on from it (README.md first, then the guides in the order of their
-- names): `client` is a client and `batch` a finished batch. A block right
-- after a line `<!-- fragment: ... -->` needs a host (cqueues, nginx) and is
-- only compiled; the example it names runs it whole
-- (spec/integration/public/examples_spec.lua). The command lines of "The lbatch
-- command" and "A first job", in any of the files, run the same way, as
-- `bin/lbatch` from this checkout, once without their [options] and once
-- with them. Every relative link between the files names a file and an
-- anchor that exist.
local H = require "helper"
local lbatch = require "lbatch"

-- README.md, then docs/*.md by name: the paths from the checkout's root
local function documents()
  local list = { "README.md" }
  for path in H.sh("cd " .. H.q(H.root) .. " && ls docs/*.md"):gmatch("[^\n]+") do list[#list + 1] = path end
  return list
end
local DOCS = documents()

-- { {code, file, heading, line, fragment}, ... }: the Lua blocks of every document
local function lua_blocks()
  local blocks = {}
  for _, file in ipairs(DOCS) do
    local heading, n, block, fragment = nil, 0, nil, false
    for line in io.lines(H.root .. "/" .. file) do
      n = n + 1
      if block then
        if line == "```" then blocks[#blocks + 1], block = block, nil
        else block.code = block.code .. line .. "\n" end
      elseif line == "```lua" then
        block = { code = "", file = file, heading = heading, line = n, fragment = fragment }
      else
        if line:find("^#+ ") then heading = line:gsub("^#+ ", "") end
        if line:find("%S") then fragment = line:find("^<!%-%- fragment") ~= nil end
      end
    end
  end
  return blocks
end

-- the indented command lines of the sections named (a heading of any level), in every
-- document, each line once
local function command_lines(sections)
  local lines, seen = {}, {}
  for _, file in ipairs(DOCS) do
    local inside = false
    for line in io.lines(H.root .. "/" .. file) do
      local heading = line:match("^#+ (.-)%s*$")
      if heading then inside = sections[heading] == true end
      local cmd = inside and line:match("^    (lbatch .-)%s*$")
      if cmd then
        cmd = cmd:gsub("%s+#.*$", "")
        if not seen[cmd] then seen[cmd], lines[#lines + 1] = true, cmd end
      end
    end
  end
  return lines
end

-- what a snippet leaves behind when it worked, by its section
local EXPECT = {
  ["Use"] = {},
  ["Many jobs at once: tasks"] = { out = { "requests%.jsonl%s+completed%s+2", "requests%-2%.jsonl%s+completed%s+2" } },
  ["Waiting"] = {},
  ["Progress on long transfers"] = { out = { "\r%d+ of %d+ bytes" }, files = { "copy.jsonl" } },
  ["Pipelines that resume"] = { out = { "q1%s+%S", "q3%s+%S" }, files = { "work/journal.jsonl" } },
  ["Flows"] = { out = { "q1%s+0\n", "q3%s+0\n" }, files = { "work-flow/results.jsonl" } },
  ["Hosts with their own loop"] = { out = { "completed" } },
  ["Building request files"] = { files = { "eval.jsonl", "eval-2.jsonl", "eval-3.jsonl" } },
  ["Reading results"] = { out = { "^0\n" }, files = { "retry.jsonl" } },
  ["CSV"] = { files = { "requests.jsonl", "answers.csv" } },
}

local function luapaths()
  local cdir = H.lua:find("luajit") and "jit" or "5.4"
  return ("LUA_PATH='%s/?.lua;%s/?/init.lua;;' LUA_CPATH='%s/build/%s/?.so;;'"):format(H.root, H.root, H.root, cdir)
end

describe("the README and the guides", function()
  local emu, dir, fixtures, done_id
  local function env()
    local ca = emu.tls and ("SSL_CERT_FILE=" .. emu.tls .. " ") or ""
    -- both keys: "Many services at once" makes an OpenAI client (OPENAI_API_KEY, its own)
    return ("env -i PATH=%s HOME=%s DASHSCOPE_API_KEY=sk-readme OPENAI_API_KEY=sk-readme-oa LBATCH_BASE_URL=%s "
      .. "LBATCH_POLL_INTERVAL=0.05 %s"):format(
      os.getenv("PATH"), dir, emu.base, ca)
  end

  setup(function()
    emu = H.emulator({ speed = 400, rate_limits = false })   -- (its batches end in a moment: the README waits on them)
    dir = H.tmpdir()
    fixtures = H.mkdir(dir .. "/fixtures")
    -- the files the snippets name: requests (one of them fails on purpose), a CSV, an image,
    -- and a finished batch's output and error files
    local chat = { model = "qwen-plus", url = "/v1/chat/completions" }
    local d = fixtures
    H.requests(d .. "/requests.jsonl", 3, setmetatable({ content = function(i)
      return i == 2 and "lbatch-emulator:fail" or "question " .. i end }, { __index = chat }))
    H.requests(d .. "/requests-2.jsonl", 2, chat)
    H.write(d .. "/questions.csv", "id,question\nq1,What is 2 + 2?\nq2,Name a prime.\nq3,\"Say \"\"hi\"\", briefly\"\n")
    H.write(d .. "/cat.png", "\137PNG\r\n\26\n\0\0\0\rIHDR")
    H.write(d .. "/prices.json", '{"qwen-plus": {"input": 0.8, "output": 2}}')
    assert(H.ok(("cp %s/spec/fixtures/judge_flow.lua %s/judge.lua"):format(H.q(H.root), d)))   -- a flow file
    H.mkdir(d .. "/report-dir")   -- a pipeline's dir, for report
    H.write(d .. "/report-dir/journal.jsonl", '{"version":1,"run":"0123456789ab","phase":"done"}\n')
    local c = lbatch.new({ api_key = "sk-readme", base_url = emu.base, cainfo = emu.tls })
    local f = assert(c:upload(d .. "/requests.jsonl"))
    local b = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions" }))
    b = assert(c:wait(b.id, { interval = 0.1 }))
    assert(c:content(b.output_file_id, { path = d .. "/out.jsonl" }))
    assert(c:content(b.error_file_id, { path = d .. "/err.jsonl" }))
    assert(H.ok(("cp %s/out.jsonl %s/output.jsonl && cp %s/err.jsonl %s/errors.jsonl"):format(d, d, d, d)))
    assert(H.ok(("cp -r %s %s/snippets"):format(d, dir)))
    done_id = b.id
    -- run RUN (adopt's): its one shard of questions.csv, stored under the run's name
    local m = assert(require("lbatch.csv").to_jsonl(d .. "/questions.csv", { path = dir .. "/run-shard.jsonl",
      model = "qwen-plus", unique = "all" }))
    assert(c:upload(m.files[1].path, { filename = "0123456789ab-1.jsonl" }))
    c:close()
  end)
  teardown(function()
    emu.stop()
    H.rm_rf(dir)
  end)

  local blocks = lua_blocks()

  it("has its Lua snippets, each run below or marked a fragment", function()
    local run, fragments = 0, 0
    for _, b in ipairs(blocks) do
      if b.fragment then fragments = fragments + 1 else run = run + 1 end
    end
    assert.is_true(run >= 8, "run " .. run)
    assert.is_true(fragments <= 2, "fragments " .. fragments)
    for _, b in ipairs(blocks) do
      if not b.fragment then assert.is_truthy(b.heading and EXPECT[b.heading] or b.heading, b.heading) end
    end
  end)

  for _, b in ipairs(blocks) do
    local name = ("%s:%d (%s)"):format(b.file, b.line, b.heading or "?")
    if b.fragment then
      it("compiles the fragment at " .. name, function()
        local fn, err = (loadstring or load)(b.code, "=" .. name)
        assert(fn, err)
      end)
    else
      it("runs the snippet at " .. name, function()
        local here = dir .. "/snippets"                    -- the snippets go on in one directory
        local path = ("%s/snippet-%s-%d.lua"):format(here, (b.file:gsub("[/.]", "-")), b.line)
        local prelude = b == blocks[1] and "" or ([[
lbatch = require "lbatch"; client = lbatch.new{}; batch = assert(client:retrieve(%q)) ]]):format(done_id)
        H.write(path, prelude .. b.code)                   -- on one line: the snippet's line numbers hold
        local out = H.sh(("cd %s && %s %s %s %s 2>&1; echo \"exit=$?\""):format(H.q(here), env(), luapaths(), H.lua, path))
        assert.matches("exit=0\n$", out)
        local want = EXPECT[b.heading] or {}
        for _, pattern in ipairs(want.out or {}) do assert.matches(pattern, out) end
        for _, file in ipairs(want.files or {}) do assert.is_true(H.exists(here .. "/" .. file), file .. "\n" .. out) end
      end)
    end
  end

  -- the command lines: placeholders made real, [options] left out and then given
  local PLACE = { N = "5", E = "/v1/chat/completions", AGE = "30d" }

  local function fresh(what)
    local c = lbatch.new({ api_key = "sk-readme", base_url = emu.base, cainfo = emu.tls })
    local f = assert(c:upload(fixtures .. "/requests-2.jsonl"))
    local id = f.id
    if what == "batch" then   -- (to cancel: running, its lines slow on the fast emulator)
      id = assert(c:create({ input_file_id = f.id, endpoint = "/v1/chat/completions",
                             metadata = { emulator_line_seconds = "100000" } })).id
    end
    c:close()
    return id
  end

  local function concrete(cmd, with_options)
    local paths = 0
    if with_options then cmd = cmd:gsub("%[(.-)%]", "%1") else cmd = cmd:gsub("%s*%[.-%]", "") end
    cmd = cmd:gsub("BATCH_ID|FILE_ID", done_id)
    cmd = cmd:gsub("BATCH_ID", cmd:find("^lbatch cancel") and fresh("batch") or done_id)
    cmd = cmd:gsub("FILE_ID%.%.%.", function() return fresh("file") .. " " .. fresh("file") end)
    cmd = cmd:gsub("PATH", function() paths = paths + 1 return "path-" .. paths .. ".jsonl" end)
    cmd = cmd:gsub("%f[%w]([NE])%f[%W]", PLACE)
    cmd = cmd:gsub("%f[%w]RUN%f[%W]", "0123456789ab")       -- a run of which the account has a file
    cmd = cmd:gsub("%f[%w]DIR%f[%W]", "report-dir")
    return cmd
  end

  local commands = command_lines({ ["The lbatch command"] = true, ["A first job"] = true })

  it("has the command's lines, one for every command", function()
    assert.is_true(#commands >= 13, #commands)
    local help = H.sh(("%s %s/bin/lbatch --help"):format(H.lua, H.root))
    for c in help:gmatch("\n  (%l[%w]+) ") do
      local seen = false
      for _, line in ipairs(commands) do seen = seen or line:find("^lbatch " .. c .. "%f[%s]") ~= nil end
      assert.is_true(seen, "neither the README nor docs/command.md has a line for `lbatch " .. c .. "`")
    end
  end)

  for i, line in ipairs(commands) do
    for _, with_options in ipairs({ false, true }) do
      it(("runs `%s` %s"):format(line, with_options and "with its options" or "without options"), function()
        local sub = ("%s/cmd-%d-%s"):format(dir, i, tostring(with_options))
        assert(H.ok(("cp -r %s %s"):format(fixtures, sub)))
        local cmd = concrete(line, with_options):gsub("^lbatch", H.lua .. " " .. H.root .. "/bin/lbatch")
        local out = H.sh(("cd %s && %s %s 2>&1; echo \"exit=$?\""):format(sub, env(), cmd))
        assert.matches("exit=0\n$", out)
      end)
    end
  end
end)

-- the README's first jobs: { {var = the key's variable its `export` names, cmd = the line}, ... }
local function first_jobs()
  local jobs, inside, var = {}, false, nil
  for line in io.lines(H.root .. "/README.md") do
    local heading = line:match("^#+ (.-)%s*$")
    if heading then inside = heading == "A first job" end
    var = inside and line:match("^    export ([%w_]+)=") or var
    local cmd = inside and line:match("^    (lbatch .-)%s*$")
    if cmd then jobs[#jobs + 1] = { var = var, cmd = cmd } end
  end
  return jobs
end

-- each first job as a newcomer runs it: only its key set, on an emulator in its provider's
-- dialect, examples/questions.csv (seven questions, the last failed by the emulator on purpose)
describe("the README's first jobs", function()
  local DIALECT = { DASHSCOPE_API_KEY = "dashscope", OPENAI_API_KEY = "openai" }
  local jobs = first_jobs()

  it("are one on DashScope and one on OpenAI", function()
    local vars = {}
    for _, job in ipairs(jobs) do vars[#vars + 1] = job.var end
    assert.are.same({ "DASHSCOPE_API_KEY", "OPENAI_API_KEY" }, vars)
  end)

  for _, job in ipairs(jobs) do
    it(("runs `%s` with %s alone, every answer in answers.csv"):format(job.cmd, job.var), function()
      local emu = H.emulator({ speed = 400, rate_limits = false, dialect = DIALECT[job.var] })
      local dir = H.tmpdir()
      assert(H.ok(("cp %s/examples/questions.csv %s/"):format(H.q(H.root), H.q(dir))))
      local cmd = job.cmd:gsub("^lbatch", H.lua .. " " .. H.root .. "/bin/lbatch")
      -- (the TLS pass's CA kept: the emulator serves HTTPS there)
      local ca = emu.tls and ("SSL_CERT_FILE=" .. H.q(os.getenv("SSL_CERT_FILE") or emu.tls) .. " ") or ""
      local out = H.sh(("cd %s && env -i PATH=%s HOME=%s %s%s=sk-first LBATCH_BASE_URL=%s LBATCH_POLL_INTERVAL=0.05 %s 2>&1; "
        .. "echo \"exit=$?\""):format(H.q(dir), os.getenv("PATH"), dir, ca, job.var, emu.base, cmd))
      emu.stop()
      assert.matches("exit=0\n$", out)
      assert.matches("answers.csv: 7 requests, 6 ok, 1 failed, 0 missing", out, 1, true)
      assert.is_true(H.exists(dir .. "/answers.csv"), out)
      H.rm_rf(dir)
    end)
  end
end)

-- a heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces as hyphens
local function anchor(heading)
  return (heading:lower():gsub("[^%w%s%-_]", ""):gsub("%s", "-"))
end

-- { [path] = {anchor = true, ...} } for a document's headings; nil: no such file
local function anchors(path)
  local text = H.read(H.root .. "/" .. path)
  if not text then return nil end
  local set, fenced = {}, false
  for line in (text .. "\n"):gmatch("(.-)\n") do
    if line:find("^```") then fenced = not fenced end
    local heading = not fenced and line:match("^#+ (.-)%s*$")
    if heading then set[anchor(heading)] = true end
  end
  return set
end

-- "dir/../x" -> "x", "./x" -> "x"
local function normal(path)
  local parts = {}
  for part in path:gmatch("[^/]+") do
    if part == ".." then parts[#parts] = nil elseif part ~= "." then parts[#parts + 1] = part end
  end
  return table.concat(parts, "/")
end

-- every relative link of a document, outside code (fenced, indented, or a code span, which
-- may run over a line's end): { {target, line}, ... }
local function links(path)
  local prose, fenced = {}, false
  for line in io.lines(H.root .. "/" .. path) do
    if line:find("^```") then fenced = not fenced
    elseif not fenced and not line:find("^    ") then prose[#prose + 1] = line
    else prose[#prose + 1] = "" end
  end
  local text = table.concat(prose, "\n"):gsub("`[^`]*`", function(span) return (span:gsub("[^\n]", "")) end)
  local found, n = {}, 0
  for line in (text .. "\n"):gmatch("(.-)\n") do
    n = n + 1
    for target in line:gmatch("%]%(([^)%s]+)%)") do
      if not target:find("^%a[%w+.-]*:") then found[#found + 1] = { target, n } end
    end
  end
  return found
end

describe("the links of the README and the guides", function()
  it("name a file and an anchor that exist", function()
    local bad, count = {}, 0
    for _, doc in ipairs(DOCS) do
      local dir = doc:match("^(.*)/") or ""
      for _, l in ipairs(links(doc)) do
        count = count + 1
        local file, frag = l[1]:match("^([^#]*)#?(.*)$")
        local target = file == "" and doc or normal((dir ~= "" and dir .. "/" or "") .. file)
        local ok = H.exists(H.root .. "/" .. target)
        if ok and frag ~= "" then
          local set = anchors(target)
          ok = set ~= nil and set[frag] == true
        end
        if not ok then bad[#bad + 1] = ("%s:%d %s"):format(doc, l[2], l[1]) end
      end
    end
    assert.are.same({}, bad)
    assert.is_true(count >= 20, "links " .. count)
  end)

  it("reach every guide from the index, docs/README.md", function()
    local linked = {}
    for _, l in ipairs(links("docs/README.md")) do linked[normal("docs/" .. l[1]:gsub("#.*", ""))] = true end
    for _, doc in ipairs(DOCS) do
      if doc:find("^docs/") and doc ~= "docs/README.md" then assert.is_true(linked[doc] == true, doc) end
    end
  end)
end)
