-- jsonl.estimate and `lbatch estimate`: requests, approximate tokens and
-- cost at batch prices, on real files whose content is known.
local H = require "helper"
local jsonl = require "lbatch.jsonl"
local cjson = require "cjson"

-- the command's exit code, its stdout and stderr together, and its stdout
local function lbatch(args)
  local err = os.tmpname()
  local out = H.sh(("%s %s/bin/lbatch %s 2>%s; echo \"exit=$?\""):format(H.lua, H.root, args, err))
  local code = tonumber(out:match("exit=(%d+)%s*$"))
  out = out:gsub("exit=%d+%s*$", "")
  local text = out .. (H.read(err) or "")
  os.remove(err)
  return code, text, out
end

-- The spec's own count, by code point (not by the library's byte
-- patterns): CJK characters count 1, the others 1/4, rounded up.
local CJK = { { 0x3000, 0x9FFF }, { 0xAC00, 0xD7FF }, { 0xF900, 0xFAFF }, { 0xFF00, 0xFFEF }, { 0x20000, 0x3FFFF } }
local function reference_tokens(strings)
  local cjk, other = 0, 0
  for _, s in ipairs(strings) do
    local i = 1
    while i <= #s do
      local c = s:byte(i)
      local len = c < 0x80 and 1 or c < 0xE0 and 2 or c < 0xF0 and 3 or 4
      local cp = len == 1 and c or c % (2 ^ (7 - len))
      for k = i + 1, i + len - 1 do cp = cp * 64 + s:byte(k) % 64 end
      local is_cjk = false
      for _, r in ipairs(CJK) do is_cjk = is_cjk or (cp >= r[1] and cp <= r[2]) end
      if is_cjk then cjk = cjk + 1 else other = other + 1 end
      i = i + len
    end
  end
  return cjk + math.ceil(other / 4), cjk, other
end

local function line(id, url, body)
  return cjson.encode({ custom_id = id, method = "POST", url = url, body = body }) .. "\n"
end

local CHAT, EMB = "/v1/chat/completions", "/v1/embeddings"

describe("estimate", function()
  local dir, a, b, prices, all_prices
  -- the texts each model sends (what the files below hold)
  local PLUS = { "Be brief.", "What is 2 + 2?", "你好，世界", "café こんにちは", "abcdefgh" }
  local EMBED = { "hello world", "abc", "defg" }
  local TURBO = { "abcd" }

  setup(function()
    dir = H.tmpdir()
    a = H.write(dir .. "/a.jsonl",
      line("1", CHAT, { model = "qwen-plus", max_tokens = 100, messages = {
        { role = "system", content = "Be brief." }, { role = "user", content = "What is 2 + 2?" } } }) ..
      line("2", CHAT, { model = "qwen-plus", max_completion_tokens = 50, messages = { { role = "user", content = {
        { type = "text", text = "你好，世界" },
        { type = "image_url", image_url = { url = "https://example.com/not-counted.png" } } } } } }) ..
      line("3", CHAT, { model = "qwen-plus", max_tokens = 30, messages = { { role = "user", content = "café こんにちは" } } }) ..
      line("4", EMB, { model = "text-embedding-v4", input = "hello world" }) ..
      line("5", EMB, { model = "text-embedding-v4", input = { "abc", "defg" } }) ..
      "{oops\n" ..
      line("6", CHAT, { model = "qwen-turbo", messages = { { role = "user", content = "abcd" } } }))
    b = H.write(dir .. "/b.jsonl",
      line("7", "/v1/completions", { model = "qwen-plus", prompt = "abcdefgh", max_tokens = 20 }))
    prices = H.write(dir .. "/prices.json",
      '{"qwen-plus": {"input": 0.8, "output": 2}, "text-embedding-v4": {"input": 0.5}}')
    all_prices = H.write(dir .. "/all.json",
      '{"qwen-plus": {"input": 0.8, "output": 2}, "text-embedding-v4": {"input": 0.5},' ..
      ' "qwen-turbo": {"input": 0.3, "output": 0.6}}')
  end)
  teardown(function() H.ok("rm -rf " .. dir) end)

  it("counts requests per model and endpoint, tokens and the output bound (the library)", function()
    -- by hand: qwen-plus 10 CJK characters (，is fullwidth) and 36 others -> 10 + 9
    assert.are.same({ 19, 10, 36 }, { reference_tokens(PLUS) })
    assert.are.same({ 5, 0, 18 }, { reference_tokens(EMBED) })
    assert.are.same({ 1, 0, 4 }, { reference_tokens(TURBO) })
    local rep = assert(jsonl.estimate({ a, b }))
    assert.are.same({ 8, 7, 1 }, { rep.lines, rep.requests, rep.skipped })
    assert.are.same({ { path = a, lines = 7, requests = 6, skipped = 1 }, { path = b, lines = 1, requests = 1, skipped = 0 } },
      rep.files)
    local plus, emb, turbo = rep.models["qwen-plus"], rep.models["text-embedding-v4"], rep.models["qwen-turbo"]
    assert.are.same({ requests = 4, endpoints = { [CHAT] = 3, ["/v1/completions"] = 1 }, cjk_chars = 10, other_chars = 36,
                      input_tokens = 19, output_tokens_max = 100 + 50 + 30 + 20, output_known = true, with_max_tokens = 4 },
      plus)
    assert.are.same({ 2, { [EMB] = 2 }, 5, 0, true }, { emb.requests, emb.endpoints, emb.input_tokens,
                                                      emb.output_tokens_max, emb.output_known })
    assert.are.same({ 1, 1, false, 0 }, { turbo.requests, turbo.input_tokens, turbo.output_known, turbo.with_max_tokens })
    assert.are.equal(19 + 5 + 1, rep.totals.input_tokens)
    assert.is_nil(rep.totals.output_tokens_max)            -- qwen-turbo's is unknown
    assert.is_false(rep.priced)
    assert.is_nil(rep.totals.input_cost)
  end)

  it("prices at half the real-time price, or --discount's", function()
    local rep = assert(jsonl.estimate({ a, b }, { prices = all_prices }))
    local plus = rep.models["qwen-plus"]
    assert.is_near(19 * 0.8 / 1e6 * 0.5, plus.input_cost, 1e-15)
    assert.is_near(200 * 2 / 1e6 * 0.5, plus.output_cost_max, 1e-15)
    assert.is_near(5 * 0.5 / 1e6 * 0.5, rep.models["text-embedding-v4"].input_cost, 1e-15)
    assert.are.equal(0, rep.models["text-embedding-v4"].output_cost_max)
    assert.is_nil(rep.models["qwen-turbo"].output_cost_max)
    assert.is_near((19 * 0.8 + 5 * 0.5 + 1 * 0.3) / 1e6 * 0.5, rep.totals.input_cost, 1e-15)
    assert.is_nil(rep.totals.output_cost_max)
    rep = assert(jsonl.estimate(b, { prices = { ["qwen-plus"] = { input = 0.8, output = 2 } }, discount = 1 }))
    assert.is_near(2 * 0.8 / 1e6, rep.totals.input_cost, 1e-15)        -- "abcdefgh": 2 tokens
    assert.is_near(20 * 2 / 1e6, rep.totals.output_cost_max, 1e-15)
  end)

  it("prints a table with the counts, the method and the costs", function()
    local code, text, stdout = lbatch(("estimate %s %s --prices %s"):format(a, b, prices))
    assert.are.equal(0, code, text)
    local plus = stdout:match("\nqwen%-plus[^\n]*")
    assert.is_string(plus, stdout)
    local cols = {}
    for c in plus:gsub("%(%d%)", ""):gmatch("%S+") do cols[#cols + 1] = c end
    assert.are.same({ "qwen-plus", "/v1/chat/completions", ",", "/v1/completions", "4", "19", "200",
                      ("%.6f"):format(19 * 0.8 / 1e6 * 0.5), ("%.6f"):format(200 * 2 / 1e6 * 0.5) }, cols)
    assert.matches("/v1/chat/completions (3), /v1/completions (1)", plus, 1, true)
    assert.matches("\nqwen%-turbo%s+/v1/chat/completions%s+1%s+1%s+%?%s+%?%s+%?\n", stdout)
    assert.matches("\ntotal%s+7%s+25%s+%?%s+%?%s+%?\n", stdout)   -- a model without a price: no total cost
    assert.matches("qwen-turbo: no price in " .. prices, stdout, 1, true)
    assert.matches("qwen-turbo: 0 of 1 requests set max_tokens", stdout, 1, true)
    assert.matches("1 line(s) are not requests", stdout, 1, true)
    assert.matches("1 per CJK character, 1 per 4 other characters", stdout, 1, true)
    assert.matches("batch prices (0.5 x the real-time prices", stdout, 1, true)
    code, text, stdout = lbatch("estimate " .. b)
    assert.are.equal(0, code, text)
    assert.matches("\nqwen%-plus%s+/v1/completions%s+1%s+2%s+20\n", stdout)
    assert.matches("no prices given", stdout, 1, true)
    assert.is_nil(stdout:find("cost", 1, true))
  end)

  it("prints one JSON object with --json", function()
    local code, text, stdout = lbatch(("estimate --json --discount 0.25 %s %s --prices %s"):format(a, b, all_prices))
    assert.are.equal(0, code, text)
    local rep = cjson.decode(stdout)
    assert.are.same({ 7, 1, 0.25, true }, { rep.requests, rep.skipped, rep.discount, rep.priced })
    assert.are.same({ 4, 19, 200 }, { rep.models["qwen-plus"].requests, rep.models["qwen-plus"].input_tokens,
                                      rep.models["qwen-plus"].output_tokens_max })
    assert.are.same({ [CHAT] = 3, ["/v1/completions"] = 1 }, rep.models["qwen-plus"].endpoints)
    assert.is_near((19 * 0.8 + 5 * 0.5 + 1 * 0.3) / 1e6 * 0.25, rep.totals.input_cost, 1e-15)
    assert.are.equal(25, rep.totals.input_tokens)
    assert.are.equal(2, #rep.files)
  end)

  it("fails on a missing file or bad prices, saying which and why", function()
    local code, text, stdout = lbatch(("estimate %s %s/nope.jsonl"):format(a, dir))
    assert.are.equal(1, code, text)
    assert.matches("lbatch estimate: io: cannot read " .. dir .. "/nope.jsonl: No such file", text, 1, true)
    assert.are.equal("", stdout)
    code, text = lbatch(("estimate %s --prices %s/nope.json"):format(a, dir))
    assert.are.equal(1, code, text)
    assert.matches("cannot read " .. dir .. "/nope.json", text, 1, true)
    local cases = {
      { "[1, 2]", "must be a JSON object of models" },
      { "{oops", "not JSON (" },
      { '"qwen-plus"', "must be a JSON object of models" },
      { '{"qwen-plus": 0.8}', '"qwen-plus" must be an object {"input": P, "output": P}' },
      { '{"qwen-plus": {"input": "cheap"}}', '"qwen-plus".input must be a number' },
      { '{"qwen-plus": {"input": -1}}', '"qwen-plus".input must be a number' },
      { '{"qwen-plus": {}}', '"qwen-plus" has neither an input nor an output price' },
    }
    for i, c in ipairs(cases) do
      local p = H.write(("%s/bad%d.json"):format(dir, i), c[1])
      code, text = lbatch(("estimate %s --prices %s"):format(a, p))
      assert.are.equal(1, code, text)
      assert.matches("lbatch estimate: invalid invalid_prices: prices " .. p .. ": ", text, 1, true)
      assert.matches(c[2], text, 1, true)
      code, text = lbatch(("estimate --json %s --prices %s"):format(a, p))
      assert.are.equal(1, code, text)
      assert.are.equal("invalid_prices", cjson.decode(text:match("^[^\n]*")).error.code)
      for _, cmd in ipairs({ "report " .. dir, "top" }) do   -- one price reader for every command
        code, text = lbatch(("%s --prices %s"):format(cmd, p))
        assert.are.equal(1, code, cmd .. ": " .. text)
        assert.matches("invalid invalid_prices: prices " .. p .. ": ", text, 1, true)
        assert.matches(c[2], text, 1, true)
      end
    end
    local rep, err = jsonl.estimate({ a }, { prices = { ["qwen-plus"] = { output = "x" } } })
    assert.is_nil(rep)
    assert.are.same({ "invalid", "invalid_prices" }, { err.kind, err.code })
    rep, err = jsonl.estimate({ dir .. "/nope.jsonl" })
    assert.is_nil(rep)
    assert.are.equal("io", err.kind)
    assert.are.equal(2, (lbatch("estimate")))
    assert.are.equal(2, (lbatch("estimate " .. a .. " --discount half")))
  end)
end)

describe("estimate of the newer endpoints", function()
  local estimate = require "lbatch.impl.formats.estimate"
  local RESP, IMG, EDIT, VID = "/v1/responses", "/v1/images/generations", "/v1/images/edits", "/v1/videos"
  local dir
  setup(function() dir = H.tmpdir() end)
  teardown(function() H.ok("rm -rf " .. dir) end)

  it("counts a responses line's instructions and input (a string, or messages of text parts)", function()
    local f = H.write(dir .. "/resp.jsonl",
      line("1", RESP, { model = "gpt-4.1", instructions = "Answer in French.", input = "Bonjour 世界",
                        max_output_tokens = 64 }) ..
      line("2", RESP, { model = "gpt-4.1", max_output_tokens = 36, input = {
        { role = "user", content = "What is this?" },
        { type = "message", role = "user", content = {
          { type = "input_text", text = "Describe it." },
          { type = "input_image", image_url = "https://example.com/not-counted.png" } } } } }))
    local want = reference_tokens({ "Answer in French.", "Bonjour 世界", "What is this?", "Describe it." })
    local rep = assert(jsonl.estimate(f, { prices = { ["gpt-4.1"] = { input = 2, output = 8 } } }))
    local m = rep.models["gpt-4.1"]
    assert.are.same({ want, 100, true }, { m.input_tokens, m.output_tokens_max, m.output_known })
    assert.is_near((want * 2 + 100 * 8) / 1e6 * 0.5, rep.totals.input_cost + rep.totals.output_cost_max, 1e-15)
    assert.is_nil(estimate.unknown(rep))
  end)

  it("counts the prompt of images and videos lines, never their output, and says why", function()
    local f = H.write(dir .. "/media.jsonl",
      line("1", IMG, { model = "gpt-image-1", prompt = "a red cube", size = "1024x1024", max_output_tokens = 5 }) ..
      line("2", EDIT, { model = "gpt-image-1", prompt = "make it blue", image = "file-abc" }) ..
      line("3", VID, { model = "sora-2", prompt = "a cube rolling", seconds = "4" }))
    local prices = { ["gpt-image-1"] = { input = 5, output = 40 }, ["sora-2"] = { input = 1, output = 1 } }
    local rep = assert(jsonl.estimate(f, { prices = prices }))
    local img, vid = rep.models["gpt-image-1"], rep.models["sora-2"]
    assert.are.same({ reference_tokens({ "a red cube", "make it blue" }), 0, false, 2 },
      { img.input_tokens, img.output_tokens_max, img.output_known, img.not_by_tokens })
    assert.are.same({ reference_tokens({ "a cube rolling" }), false }, { vid.input_tokens, vid.output_known })
    assert.is_number(rep.totals.input_cost)
    assert.is_nil(rep.totals.output_cost_max)            -- not a zero
    assert.matches("priced per image", estimate.unknown(rep), 1, true)
    local v = H.write(dir .. "/video.jsonl", line("1", VID, { model = "sora-2", prompt = "a cube rolling" }))
    assert.matches("/v1/videos lines of sora-2: videos are priced per second of video",
      estimate.unknown(assert(jsonl.estimate(v, { prices = prices }))), 1, true)
  end)
end)
