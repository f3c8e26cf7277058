-- `lbatch report DIR --output report.html` after a small pipeline on the
-- emulator, rendered by headless Chromium: the charts and counts the page
-- shows.
local H = require "helper"
local lbatch = require "lbatch"
local pipeline = require "lbatch.pipeline"

local function chromium()
  for _, name in ipairs({ "chromium", "chromium-browser" }) do
    if H.ok("command -v " .. name .. " >/dev/null") then return name end
  end
end

describe("lbatch report", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 200, tls = false, rate_limits = false })
    dir = H.tmpdir()
    local client = lbatch.new({ api_key = "k", base_url = emu.base })
    local reqs = {}
    for i = 1, 12 do
      reqs[i] = { custom_id = "c" .. i, body = { model = "qwen-plus", messages = { { role = "user",
        content = i % 4 == 0 and "lbatch-emulator:fail" or "n" .. i } } } }
    end
    assert(pipeline.run({ client = client, requests = reqs, dir = dir .. "/work", max_lines = 4, poll_interval = 0.05 }))
    client:close()
  end)
  teardown(function()
    emu.stop()
    H.rm_rf(dir)
  end)

  it("writes one self-contained page with the timeline, outcomes, codes, tokens and slowest jobs", function()
    local page = dir .. "/report.html"
    local code, out, err = H.lbatch(("report %s --output %s"):format(H.q(dir .. "/work"), H.q(page)), { cwd = H.root })
    assert.matches("12 requests, 9 ok, 3 failed", out .. err)
    assert.are.equal(0, code, out .. err)
    local html = H.read(page)
    assert.is_nil(html:find("https?://"), "a network resource")
    assert.is_nil(html:find("<script"))
    assert.is_nil(html:find("<link"))
    local bin = chromium()
    if not bin then
      pending("chromium is not installed (make deps)")
      return
    end
    local profile = H.tmpdir()
    local dom = H.sh(("%s --headless --no-sandbox --disable-gpu --disable-background-networking "
      .. "--disable-component-update --disable-sync --no-first-run --user-data-dir=%s --dump-dom file://%s 2>/dev/null")
      :format(bin, H.q(profile), page))
    H.rm_rf(profile)
    assert.matches("<h1>lbatch report: run %x+</h1>", dom)
    assert.matches('<span id="requests">12</span>', dom)
    assert.matches('<span id="ok">9</span>', dom)
    assert.matches('<span id="failed">3</span>', dom)
    -- the charts: a timeline bar for each of the 3 shards, the outcome bars, a code's bar, a model's tokens
    for _, id in ipairs({ "timeline", "outcomes", "codes", "tokens" }) do
      assert.matches('<svg id="' .. id .. '"', dom)
    end
    local shards = select(2, dom:gsub('<rect class="bar shard" data%-status="completed"', ""))
    assert.equals(3, shards)
    local bars = 0
    for x, w in dom:gmatch('<rect class="bar shard"[^>]- x="(%d+)" y="%d+" width="(%d+)"') do
      assert.is_true(tonumber(x) >= 200 and tonumber(x) + tonumber(w) <= 600, x .. " + " .. w)  -- on the time axis
      bars = bars + 1
    end
    assert.equals(3, bars)
    assert.matches('data%-label="ok" data%-value="9"', dom)
    assert.matches('data%-label="failed" data%-value="3"', dom)
    assert.matches('<svg id="tokens".-data%-label="qwen%-plus" data%-value="[1-9]%d*"', dom)
    local slow = dom:match('<table id="slowest">(.-)</table>')
    assert.equals(3, select(2, slow:gsub("<td>batch_", "")))
  end)
end)
