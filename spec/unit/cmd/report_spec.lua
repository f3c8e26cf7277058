-- lbatch.report with no server: a hand-made pipeline dir (journal and
-- result files) read and written as one page with no external resource.
local H = require "helper"
local report = require "lbatch.cmd.report"
local cjson = require "cjson"

local function line(t) return cjson.encode(t) .. "\n" end

describe("lbatch.cmd.report", function()
  it("reads the journal and the results, and writes a self-contained page with its charts", function()
    local dir = H.tmpdir()
    local out = H.write(dir .. "/s1.output.jsonl",
      line({ id = "1", custom_id = "a", response = { status_code = 200, body = { model = "qwen-plus",
        choices = { { message = { content = "hi" } } }, usage = { prompt_tokens = 5, completion_tokens = 2,
        total_tokens = 7 } } }, error = cjson.null })
      .. line({ id = "2", custom_id = "b", response = { status_code = 500, body = { error = { code = "server_error",
        message = "x" } } }, error = cjson.null }))
    H.write(dir .. "/journal.jsonl", line({ version = 1, run = "r123", phase = "done" })
      .. line({ k = 1, shard = { k = 1, name = "r123-1.jsonl", step = "done", status = "completed", lines = 2,
        model = "qwen-plus", output = out, times = { created = 100, in_progress = 110, ended = 160 },
        counts = { total = 2, completed = 1, failed = 1 } } }))
    local st = assert(report.read(dir))
    assert.are.equal("r123", st.run)
    assert.are.equal(2, st.summary.total)
    assert.are.equal(1, st.summary.ok)
    local page = report.html(st)
    assert.matches("^<!DOCTYPE html>", page)
    assert.matches("<svg", page, 1, true)
    -- the timeline's one shard spans the run: its bar fills the time axis (x 200 to 600)
    assert.matches('<rect class="bar shard" data%-status="completed" x="200" y="5" width="400"', page)
    assert.matches("server_error", page, 1, true)
    assert.matches("<title>lbatch report r123</title>", page, 1, true)   -- the browser tab names the run
    assert.matches("<h1>lbatch report: run r123</h1>", page, 1, true)
    assert.is_nil(page:find("https?://[%w.]"), "no external resource")
    assert.is_nil(page:find("<script", 1, true))
    assert.truthy(report.write(dir, dir .. "/r.html"))
    assert.are.equal(page, H.read(dir .. "/r.html"))
  end)

  it("keeps every timeline bar on the time axis, a shard that ends as the run ends too", function()
    local dir = H.tmpdir()
    H.write(dir .. "/journal.jsonl", line({ version = 1, run = "r9", phase = "done" })
      .. line({ k = 1, shard = { k = 1, name = "a", step = "done", status = "completed", lines = 1,
        times = { created = 100, ended = 200 } } })
      .. line({ k = 2, shard = { k = 2, name = "b", step = "done", status = "completed", lines = 1,
        times = { created = 200, ended = 200 } } })    -- (whole seconds: a last shard of 0 s, at the end)
      .. line({ k = 3, shard = { k = 3, name = "c", step = "done", status = "completed", lines = 1,
        times = { created = 125, ended = 150 } } }))
    local page = report.html(assert(report.read(dir)))
    local bars = {}
    for x, w in page:gmatch('<rect class="bar shard"[^>]- x="(%d+)" y="%d+" width="(%d+)"') do
      assert.is_true(tonumber(x) >= 200 and tonumber(x) + tonumber(w) <= 600, x .. " + " .. w)
      bars[#bars + 1] = x .. "+" .. w
    end
    assert.are.same({ "200+400", "598+2", "300+100" }, bars)   -- (c: a quarter in, a quarter long)
  end)

  it("escapes what the journal holds, and fails with an error object without one", function()
    local dir = H.tmpdir()
    H.write(dir .. "/journal.jsonl", line({ version = 1, run = "<script>x</script>", phase = "done" }))
    local page = report.html(assert(report.read(dir)))
    assert.is_nil(page:find("<script>x", 1, true))
    local v, err = report.read(H.tmpdir())
    assert.is_nil(v)
    assert.are.equal("io", err.kind)
  end)
end)
