-- The join of results to inputs, held against a plain reference join
-- (every line decoded with cjson into Lua tables) on random real files:
-- shuffled answers, errors, missing and orphan results, duplicates,
-- escaped ids, CRLF, blank lines, a last line without a newline; with the
-- whole index in memory and in chunks as small as one request; by groups.
local H = require "helper"
local results = require "lbatch.results"
local cjson = require "cjson"

local function write(path, lines, opts)
  local f = assert(io.open(path, "wb"))
  for i, l in ipairs(lines) do
    local eol = (opts and opts.crlf and i % 3 == 0) and "\r\n" or "\n"
    if opts and opts.no_last_newline and i == #lines then eol = "" end
    f:write(l, eol)
    if opts and opts.blank and i % 5 == 0 then f:write("\n") end
  end
  f:close()
  return path
end

local function shuffle(t, rnd)
  for i = #t, 2, -1 do local j = rnd(i) t[i], t[j] = t[j], t[i] end
  return t
end

-- n requests, with ids that LuaJIT's string hash finds hardest (pad: that
-- many bytes more a question)
local function make_case(dir, n, rnd, tag, pad)
  local ids, inputs, outs, errs = {}, {}, {}, {}
  for i = 1, n do
    ids[i] = (rnd(9) == 1) and ('q"' .. i .. '\\x') or ("req-%07d"):format(i)   -- some need an escape
    inputs[i] = cjson.encode({ custom_id = ids[i], method = "POST", url = "/v1/chat/completions",
      body = { model = "qwen-plus", messages = { { role = "user", content = "question " .. i
        .. ("?"):rep(pad or 0) } } } })
  end
  local fate = {}
  for i = 1, n do
    local r = rnd(20)
    if r == 1 then fate[ids[i]] = "missing"
    elseif r == 2 then
      fate[ids[i]] = "error"
      errs[#errs + 1] = cjson.encode({ id = "e" .. i, custom_id = ids[i], response = cjson.null,
        error = { code = "batch_expired", message = "not run" } })
    else
      fate[ids[i]] = "ok"
      outs[#outs + 1] = cjson.encode({ id = "o" .. i, custom_id = ids[i], response = { status_code = 200,
        request_id = "r" .. i, body = { model = "qwen-plus", choices = { { message = { content = "answer " .. i } } },
          usage = { prompt_tokens = i, completion_tokens = 1, total_tokens = i + 1 } } }, error = cjson.null })
      if r == 3 then outs[#outs + 1] = outs[#outs]:gsub("answer", "later answer") end  -- a duplicate: the first wins
    end
  end
  for k = 1, rnd(4) - 1 do                                       -- results nobody asked for
    outs[#outs + 1] = cjson.encode({ id = "x", custom_id = "orphan-" .. tag .. "-" .. k,
      response = { status_code = 200, body = {} } })
  end
  shuffle(outs, rnd) shuffle(errs, rnd)
  local base = dir .. "/" .. tag
  return {
    ids = ids, fate = fate,
    inputs = write(base .. ".in.jsonl", inputs, { crlf = true, blank = true }),
    output = write(base .. ".out.jsonl", outs, { crlf = true, no_last_newline = true }),
    errors = write(base .. ".err.jsonl", errs, { blank = true }),
  }
end

-- the reference: everything decoded into Lua tables
local function reference(case)
  local by_id, orphans = {}, {}
  for _, p in ipairs({ case.output, case.errors }) do
    for line in io.lines(p) do
      line = line:gsub("\r$", "")
      if line ~= "" then
        local r = cjson.decode(line)
        if by_id[r.custom_id] == nil then by_id[r.custom_id] = r end
      end
    end
  end
  local want, asked = {}, {}
  for line in io.lines(case.inputs) do
    line = line:gsub("\r$", "")
    if line ~= "" then
      local req = cjson.decode(line)
      local r = by_id[req.custom_id]
      asked[req.custom_id] = true
      want[#want + 1] = { id = req.custom_id, missing = r == nil,
        content = r and r.response ~= cjson.null and r.response.body.choices and r.response.body.choices[1].message.content or nil,
        error_code = r and r.error ~= cjson.null and r.error.code or nil, line = line }
    end
  end
  for id in pairs(by_id) do if not asked[id] then orphans[#orphans + 1] = id end end
  table.sort(orphans)
  return want, orphans
end

local function json_id(line)
  return cjson.decode(line).custom_id
end

local function got(reader)
  local out = {}
  for rec, err in reader:each() do
    assert.is_truthy(rec, tostring(err))
    out[#out + 1] = { id = rec.custom_id, missing = rec.missing == true, content = rec.content,
      error_code = rec.error_code, line = rec.line }
    assert.are.equal(rec.custom_id, rec.input.custom_id)
    assert.are.equal(rec.input.body.messages[1].content, rec.prompt)
  end
  local orphans = reader.orphans
  table.sort(orphans)
  return out, orphans
end

describe("the join of results to inputs", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  it("matches a plain reference join on random files, whole and in chunks down to one request", function()
    local seed = os.time()
    math.randomseed(seed)
    -- (a join in chunks of k requests reads the answers once a chunk: its
    -- cost grows as n * n / k, so the smallest chunks get the smaller files)
    for round = 1, 12 do
      local n = math.random(1, round % 2 == 0 and 400 or 60)
      local case = make_case(dir, n, math.random, "r" .. round)
      local want, want_orphans = reference(case)
      for _, max_index in ipairs(n <= 60 and { 1, 2, 7, 64, 1000000 } or { 7, 64, 1000000 }) do
        local r = assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs,
                                        max_index = max_index }))
        local records, orphans = got(r)
        local where = ("seed %d round %d n %d max_index %d"):format(seed, round, n, max_index)
        assert.are.same(want, records, where)
        assert.are.same(want_orphans, orphans, where)
      end
    end
  end)

  it("lists each orphan once, however often the end is reached (placed groups, chunks, a call after nil)", function()
    local function group(tag, n, orphans)
      local ins, outs = {}, {}
      for i = 1, n do
        ins[i] = ('{"custom_id":"%s%d","body":{}}'):format(tag, i)
        outs[i] = ('{"custom_id":"%s%d","response":{"status_code":200,"body":{"choices":[{"message":{"content":"c"}}]}}}')
          :format(tag, i)
      end
      for k = 1, orphans do outs[#outs + 1] = ('{"custom_id":"orphan-%s%d","response":{"status_code":200}}'):format(tag, k) end
      return { inputs = write(dir .. "/orph-" .. tag .. ".in.jsonl", ins),
               output = write(dir .. "/orph-" .. tag .. ".out.jsonl", outs) }
    end
    local groups = { group("s", 10, 1), group("r", 2, 1) }
    for _, max_index in ipairs({ 1000000, 1 }) do
      -- (the sample's records placed after the others' end: the others' iterator is asked again)
      local r = assert(results.open({ groups = groups, max_index = max_index,
                                      placed = { groups = 1, at = function(j) return j + 5 end } }))
      local it, n = r:each(), 0
      for rec in it do
        assert.is_truthy(rec.ok)
        n = n + 1
      end
      assert.is_nil(it())                                   -- and once more after its nil
      assert.are.equal(12, n)
      table.sort(r.orphans)
      assert.are.same({ "orphan-r1", "orphan-s1" }, r.orphans, "max_index " .. max_index)
    end
  end)

  it("joins group by group, each group's answers to its own inputs", function()
    local a = make_case(dir, 50, math.random, "ga")
    local b = make_case(dir, 70, math.random, "gb")
    local wa, oa = reference(a)
    local wb, ob = reference(b)
    local r = assert(results.open({ groups = {
      { output = a.output, errors = a.errors, inputs = a.inputs },
      { output = b.output, errors = b.errors, inputs = b.inputs } }, max_index = 16 }))
    local records, orphans = got(r)
    local want = {}
    for _, w in ipairs(wa) do want[#want + 1] = w end
    for _, w in ipairs(wb) do want[#want + 1] = w end
    local want_orphans = {}
    for _, o in ipairs(oa) do want_orphans[#want_orphans + 1] = o end
    for _, o in ipairs(ob) do want_orphans[#want_orphans + 1] = o end
    table.sort(want_orphans)
    assert.are.same(want, records)
    assert.are.same(want_orphans, orphans)
  end)

  -- every record of a join, and a copy of each one's own fields (pairs)
  local function records_of(reader, opts)
    local recs, own = {}, {}
    for rec, err in reader:each(opts) do
      assert.is_truthy(rec, tostring(err))
      local t = {}
      for k, v in pairs(rec) do t[k] = v end
      recs[#recs + 1], own[#own + 1] = rec, t
    end
    return recs, own
  end

  it("each{fields} makes an ok record of those fields (the rest as without it), every other record whole", function()
    local case = make_case(dir, 400, math.random, "fields")
    local function open(max_index)
      return assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs,
                                   max_index = max_index }))
    end
    local whole, whole_own = records_of(open())
    local oks = 0
    for _, fields in ipairs({ { "content" }, { "status_code", "content", "usage", "model" }, { "line" },
                              { "body" }, { "prompt", "request_id" } }) do
      for _, max_index in ipairs({ 7, 1000000 }) do
        local recs, own = records_of(open(max_index), { fields = fields })
        local asked, keeps_line = {}, false
        for _, f in ipairs(fields) do
          asked[f] = true
          keeps_line = keeps_line or f == "line" or f == "body" or f == "prompt"
        end
        assert.are.equal(#whole, #recs)
        for i, w in ipairs(whole) do
          local g, where = recs[i], ("record %d, fields %s"):format(i, table.concat(fields, ","))
          if w.ok then
            if not w.custom_id:find('"', 1, true) then   -- (an escaped id is joined in Lua: whole)
              oks = oks + 1
              for k in pairs(own[i]) do   -- its own fields: only those asked for, custom_id and ok
                assert.is_true(k == "custom_id" or k == "ok" or asked[k] or (k == "line" and keeps_line),
                  where .. ": " .. k)
              end
              for _, f in ipairs({ "content", "usage", "body", "model", "request_id" }) do
                if not asked[f] then   -- one left out is an error to read, never a silent nil
                  local ok, msg = pcall(function() return g[f] end)
                  assert.is_false(ok, where .. ": " .. f)
                  assert.matches("rec." .. f .. " was not asked for", msg, 1, true)
                end
              end
              assert.is_nil(g.missing, where)
              assert.is_nil(g.class, where)
            end
            assert.are.equal(w.custom_id, g.custom_id, where)
            assert.are.equal(true, g.ok, where)
            for f in pairs(asked) do assert.are.same(w[f], g[f], where .. ": " .. f) end
          else
            assert.are.same(whole_own[i], own[i], where)   -- failed and missing: whole
          end
        end
      end
    end
    assert.is_true(oks > 100)
    assert.has_error(function() open():each({ fields = { "contnet" } }) end,
      "lbatch.results.each: opts.fields[1] (contnet) is not a field of a record")
    assert.has_error(function() open():each({ fields = "content" }) end,
      "lbatch.results.each: opts.fields must be a list of field names")
    assert.has_error(function() open():each({ fields = { content = true } }) end,
      "lbatch.results.each: opts.fields must be a list of field names (it has the key content)")
    assert.has_error(function() open():each({ field = { "content" } }) end,
      "lbatch.results.each: opts.field is not an option (fields is)")
    assert.has_error(function() open():each("content") end, "lbatch.results.each: opts must be a table (got string)")
  end)

  it("joins a window whose inputs end one past a batch (its records are made 256 at a call)", function()
    for _, n in ipairs({ 255, 256, 257, 513 }) do
      local ins, outs = {}, {}
      for i = 1, n do
        ins[i] = ('{"custom_id":"b%d","method":"POST","url":"/v1/chat/completions","body":{}}'):format(i)
        outs[i] = ('{"custom_id":"b%d","response":{"status_code":200,"body":{"choices":[{"message":{"content":"%d"}}]}}}')
          :format(i, i)
      end
      shuffle(outs, math.random)
      local base = dir .. "/batch" .. n
      write(base .. ".in.jsonl", ins)
      write(base .. ".out.jsonl", outs)
      for _, opts in ipairs({ {}, { fields = { "content" } } }) do
        local recs = records_of(assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" })), opts)
        assert.are.equal(n, #recs)
        for i, rec in ipairs(recs) do
          assert.are.same({ "b" .. i, true, tostring(i) }, { rec.custom_id, rec.ok, rec.content }, n .. ": record " .. i)
        end
      end
    end
  end)

  it("gives a joined record's usage as lua-cjson decodes it, whatever its keys (some made strings once a batch)", function()
    local usages = {
      '{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}',
      '{"total_tokens":7,"prompt_tokens":3}',
      '{"prompt_tokens":3,"prompt_tokens_details":{"cached_tokens":2},"completion_tokens":4,'
        .. '"completion_tokens_details":{"reasoning_tokens":1},"total_tokens":7}',
      '{"prompt_tokens":3,"prompt_token":1,"total_tokens_":2,"cached_tokens":5,"reasoning_tokens":6,"input_tokens":8}',
      '{"total\\u005ftokens":7,"prompt_tokens":null,"completion_tokens":4.5,"":0}',
      '{}',
    }
    local ins, outs = {}, {}
    for i, u in ipairs(usages) do
      ins[i] = ('{"custom_id":"u%d","method":"POST","url":"/v1/chat/completions","body":{}}'):format(i)
      outs[i] = ('{"custom_id":"u%d","response":{"status_code":200,"body":{"choices":[{"message":{"content":"%d"}}],'
        .. '"usage":%s}}}'):format(i, i, u)
    end
    local base = dir .. "/usage"
    write(base .. ".in.jsonl", ins)
    write(base .. ".out.jsonl", outs)
    for _, opts in ipairs({ {}, { fields = { "usage" } } }) do
      local recs = records_of(assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" })), opts)
      assert.are.equal(#usages, #recs)
      for i, rec in ipairs(recs) do
        assert.are.same(results.record(outs[i]).usage, rec.usage, usages[i])
        assert.are.same(require("lbatch.json").normalize(cjson.decode(usages[i])), rec.usage, usages[i])
      end
    end
  end)

  it("keeps a record lean when its request only looks like it asks for JSON (an f, a format, not format\")", function()
    local ins, outs = {}, {}
    -- (its last bytes, where a byte-by-byte search looks; a content that
    -- ends in "format" has format" in the line, and comes whole to be checked)
    local tails = { "f", "off", "formats", 'format\\"', "the format is free" }
    for i, tail in ipairs(tails) do
      ins[i] = ('{"custom_id":"f%d","body":{"messages":[{"role":"user","content":"%s"}]}}'):format(i, tail)
      outs[i] = ('{"custom_id":"f%d","response":{"status_code":200,"body":{"choices":[{"message":{"content":"x"}}],'
        .. '"usage":{"total_tokens":1}}}}'):format(i)
    end
    local base = dir .. "/lean"
    write(base .. ".in.jsonl", ins)
    write(base .. ".out.jsonl", outs)
    local recs, own = records_of(assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" })),
      { fields = { "content" } })
    assert.are.equal(#tails, #recs)
    for i in ipairs(tails) do
      local keys = {}
      for k in pairs(own[i]) do keys[#keys + 1] = k end
      table.sort(keys)
      assert.are.same({ "content", "custom_id", "ok" }, keys, tails[i])   -- (a whole one holds usage, line, ...)
    end
  end)

  it("an answer lua-cjson refuses (a lone surrogate in a field no one reads) is not ok, with fields or without", function()
    local base = dir .. "/sur"
    write(base .. ".in.jsonl", { '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}',
      '{"custom_id":"b","method":"POST","url":"/v1/chat/completions","body":{}}',
      '{"custom_id":"c","method":"POST","url":"/v1/chat/completions","body":{}}',
      '{"custom_id":"d","method":"POST","url":"/v1/chat/completions","body":{}}' })
    local function ans(id, extra)
      return '{"id":"x","custom_id":"' .. id .. '","response":{"status_code":200,"body":{' .. extra
        .. '"choices":[{"message":{"content":"hi"},"finish_reason":"stop"}]}},"error":null}'
    end
    write(base .. ".out.jsonl", { ans("c", '"object":"\\udc00",'), ans("a", ""), ans("b", '"object":"\\ud800x",'),
      ans("d", '"object":"\\ud800\\u0041",') })   -- a high surrogate before an escape that is not a low one
    for _, opts in ipairs({ {}, { fields = { "content" } }, { fields = { "status_code" } } }) do
      local recs = records_of(assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" })), opts)
      assert.are.same({ "a", "b", "c", "d" }, { recs[1].custom_id, recs[2].custom_id, recs[3].custom_id, recs[4].custom_id })
      assert.are.same({ true, false, false, false }, { recs[1].ok, recs[2].ok, recs[3].ok, recs[4].ok })
      for i = 2, 4 do assert.are.equal("invalid_result_line", recs[i].error_code) end
    end
  end)

  -- an ok chat answer to request `id`, its content `content`
  local function chat_answer(id, content)
    return cjson.encode({ id = "o", custom_id = id, response = { status_code = 200, request_id = "r",
      body = { model = "m", choices = { { message = { content = content } } } } }, error = cjson.null })
  end

  it("each{fields} still checks an answer against the JSON its request asks for", function()
    local function req(id, fmt)
      return cjson.encode({ custom_id = id, method = "POST", url = "/v1/chat/completions", body = { model = "m",
        messages = { { role = "user", content = "q" } }, response_format = fmt and { type = "json_object" } or nil } })
    end
    local base = dir .. "/fmt"
    write(base .. ".in.jsonl", { req("a", true), req("b", true), req("c", false) })
    write(base .. ".out.jsonl", { chat_answer("b", "not json"), chat_answer("a", '{"x":1}'), chat_answer("c", "plain") })
    for _, fields in ipairs({ { "content" }, { "content", "status_code", "id", "request_id", "model", "created",
                                               "usage", "reasoning", "embedding", "line", "body" } }) do
      local r = assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" }))
      local recs = records_of(r, { fields = fields })
      assert.are.same({ true, false, true }, { recs[1].ok, recs[2].ok, recs[3].ok })
      assert.are.same({ x = 1 }, recs[1].json)
      assert.are.equal("invalid_answer", recs[2].class)
      assert.are.equal("plain", recs[3].content)
    end
  end)

  it("checks an answer against the JSON its request asks for with an escaped key too", function()
    -- a JSON decoder (the service's) reads "response\u005fformat" as response_format
    local function req(id)
      return ('{"custom_id":"%s","method":"POST","url":"/v1/chat/completions","body":{"model":"m",'
        .. '"messages":[{"role":"user","content":"q"}],"response\\u005fformat":{"type":"json_object"}}}'):format(id)
    end
    local base = dir .. "/escfmt"
    write(base .. ".in.jsonl", { req("a"), req("b") })
    write(base .. ".out.jsonl", { chat_answer("b", "not json"), chat_answer("a", '{"x":1}') })
    for _, opts in ipairs({ {}, { fields = { "content" } } }) do
      local recs = records_of(assert(results.open({ output = base .. ".out.jsonl", inputs = base .. ".in.jsonl" })), opts)
      assert.are.same({ true, false }, { recs[1].ok, recs[2].ok })
      assert.are.same({ x = 1 }, recs[1].json)
      assert.are.equal("invalid_answer", recs[2].class)
    end
  end)

  it("checks many groups' files with a pause after each (a host's step stays short)", function()
    local groups = {}
    for i = 1, 20 do
      local c = make_case(dir, 3, math.random, "p" .. i)
      groups[i] = { output = c.output, errors = c.errors, inputs = c.inputs }
    end
    local pauses = 0
    local r = assert(results.open({ groups = groups, pause = function() pauses = pauses + 1 end }))
    assert.are.equal(60, pauses)                        -- 60 files checked
    assert.are.equal(60, #got(r))
    assert.has_error(function() results.open({ groups = groups, pause = 1 }) end)
  end)

  it("resubmits byte for byte what did not run, in chunks as whole", function()
    local case = make_case(dir, 300, math.random, "rs")
    local want = {}
    for line in io.lines(case.inputs) do
      line = line:gsub("\r$", "")
      if line ~= "" then
        local fate = case.fate[cjson.decode(line).custom_id]
        if fate ~= "ok" then want[#want + 1] = line end
      end
    end
    for _, max_index in ipairs({ 5, 1000000 }) do
      local r = assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs,
                                      max_index = max_index }))
      local path = dir .. "/again-" .. max_index .. ".jsonl"
      assert.are.equal(#want, assert(r:resubmit(path)))
      local lines = {}
      for l in io.lines(path) do lines[#lines + 1] = l end
      assert.are.same(want, lines)
    end
  end)

  -- (core.window reads a window's answers in file order, close ones in one
  -- read of up to 256 KB, and at most 16 MB of them a window; the rest one
  -- by one)
  it("matches the reference join with answers that straddle its reads, and windows past their byte budget", function()
    local rnd = math.random
    local sizes = { 1, 500, 2040, 2047, 2048, 2100, 5000, 70000, 262100, 262144, 300000 }
    local n = 160
    local inputs, outs = {}, {}
    for i = 1, n do
      local id = ("big-%04d"):format(i)
      inputs[i] = cjson.encode({ custom_id = id, body = { messages = { { role = "user", content = "q" .. i } } } })
      if i % 17 ~= 5 then                                   -- some missing
        local text = ("%d:"):format(i) .. string.rep(string.char(97 + i % 26), sizes[rnd(#sizes)])
        outs[#outs + 1] = cjson.encode({ id = "o" .. i, custom_id = id, response = { status_code = 200,
          body = { choices = { { message = { content = text } } } } }, error = cjson.null })
      end
    end
    shuffle(outs, rnd)
    local case = { inputs = write(dir .. "/big.in.jsonl", inputs), output = write(dir .. "/big.out.jsonl", outs,
      { crlf = true }), errors = write(dir .. "/big.err.jsonl", {}) }
    local want = reference(case)
    for _, max_index in ipairs({ 1000000, 37 }) do
      local r = assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs,
                                      max_index = max_index }))
      local records = {}
      for rec, err in r:each() do
        assert.is_truthy(rec, tostring(err))
        records[#records + 1] = { id = rec.custom_id, missing = rec.missing == true, content = rec.content,
          error_code = rec.error_code, line = rec.line }
      end
      assert.are.same(want, records, "max_index " .. max_index)
    end
  end)

  -- (core.window reads the input lines too, about 4 MB at a time)
  it("joins input lines longer than a window's read, and names an input line over the service's limit", function()
    local service = require "lbatch.impl.api.service"
    local limit = service.LIMITS.max_line_bytes
    local function req(id, size)
      return cjson.encode({ custom_id = id, body = { messages = { { role = "user", content = string.rep("x", size) } } } })
    end
    local function ans(id)
      return cjson.encode({ custom_id = id, response = { status_code = 200,
        body = { choices = { { message = { content = "a-" .. id } } } } }, error = cjson.null })
    end
    local ids, inputs, outs = {}, {}, {}
    for i, size in ipairs({ 10, 5 * 1024 * 1024, 20, 4 * 1024 * 1024 - 30, 4 * 1024 * 1024 + 7, 10 }) do
      ids[i] = "long-" .. i
      inputs[i] = req(ids[i], size)
      outs[#outs + 1] = ans(ids[i])
    end
    local case = { inputs = write(dir .. "/long.in.jsonl", inputs, { blank = true }),
                   output = write(dir .. "/long.out.jsonl", shuffle(outs, math.random)) }
    local got_ids = {}
    for rec, err in assert(results.open({ output = case.output, inputs = case.inputs })):each() do
      assert.is_truthy(rec, tostring(err))
      assert.are.equal("a-" .. rec.custom_id, rec.content)
      assert.are.equal(rec.custom_id, json_id(rec.line))
      got_ids[#got_ids + 1] = rec.custom_id
    end
    assert.are.same(ids, got_ids)
    inputs[3] = req("long-3", limit + 1)
    write(case.inputs, inputs)
    local it = assert(results.open({ output = case.output, inputs = case.inputs })):each()
    local rec, err
    repeat rec, err = it() until not rec
    assert.are.equal(false, rec)
    assert.are.equal("io", err.kind)
    assert.matches("long.in.jsonl", err.message, 1, true)
    assert.matches("a line of more than " .. limit .. " bytes", err.message, 1, true)
  end)

  -- (a window holds up to about 50 MB outside the Lua heap, which the
  -- collector does not see: the groups share one, given back to the
  -- system after the last, whatever its allocator did before: glibc keeps
  -- in its heap a freed block of a size it has seen mapped and freed once.
  -- In a process of its own, so that no other spec's memory is counted.)
  it("by groups, holds one window at a time and gives it back after the last group #memory", function()
    -- (the lines go straight to their files: 50,000 such strings kept alive differ only where
    -- Lua 5.1's string hash does not look, and every string the join makes would then be
    -- interned through one chain of them: minutes instead of seconds)
    local g = { inputs = dir .. "/mem.in.jsonl", output = dir .. "/mem.out.jsonl" }
    local fi, fo = assert(io.open(g.inputs, "w")), assert(io.open(g.output, "w"))
    for i = 1, 25000 do
      local id = ("mem-%06d"):format(i)
      fi:write(cjson.encode({ custom_id = id, body = { messages = { { role = "user", content = ("w"):rep(150) } } } }), "\n")
      fo:write(cjson.encode({ custom_id = id, response = { status_code = 200,
        body = { choices = { { message = { content = ("a"):rep(120) } } } } } }), "\n")
    end
    assert(fi:close()) assert(fo:close())
    local script = dir .. "/mem.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local results = require "lbatch.results"
      local function rss()
        for l in io.lines("/proc/self/status") do
          local kb = l:match("^VmRSS:%s*(%d+)")
          if kb then return tonumber(kb) / 1024 end
        end
      end
      local g = { inputs = arg[1], output = arg[2] }
      local groups = {}
      for i = 1, 12 do groups[i] = g end
      local function join()   -- its iterator kept to the end: the window is not the collector's to free
        local n, peak, it = 0, 0, assert(results.open({ groups = groups })):each()
        for rec in it do
          assert(rec.ok)
          n = n + 1
          if n % 5000 == 0 then peak = math.max(peak, rss()) end
        end
        collectgarbage() collectgarbage()
        return n, peak, rss(), it
      end
      local n = join()               -- (the allocator has seen the window's blocks come and go)
      collectgarbage() collectgarbage()
      local after = rss()            -- (no window left: its iterator is gone)
      local n2, peak, again, it = join()
      print(n, n2, peak - after, again - after, it ~= nil)
    ]])
    assert(f:close())
    local out = H.sh(("%s %s %s %s 2>&1"):format(H.lua, H.q(script), H.q(g.inputs), H.q(g.output)))
    local n, n2, peak, grown = out:match("^(%d+)%s+(%d+)%s+(%S+)%s+(%S+)")
    assert.is_truthy(n, out)
    assert.are.same({ 12 * 25000, 12 * 25000 }, { tonumber(n), tonumber(n2) })
    assert.is_true(tonumber(peak) < 40, ("RSS grew %.0f MB over 12 groups"):format(peak))
    -- (the window, about 12 MB here: given back at the end)
    assert.is_true(tonumber(grown) < 4, ("RSS %.1f MB over what it was after the same join before"):format(grown))
  end)

  -- the index holds where each answer was: read from a file that is not
  -- what it was, an answer would be another request's, or a cut line.
  -- (The cases' 6,000 questions of 4 KB are more than a window's 16 MB of
  -- inputs: the change comes before the second window is read.)
  local function after_first(case, change)
    local r = assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs }))
    local it = r:each()
    assert.is_truthy(it())                                  -- the answers are indexed
    change()
    local rec, err
    local seen = 0
    repeat
      rec, err = it()
      if rec then
        seen = seen + 1
        assert.are.equal(rec.custom_id, json_id(rec.line))  -- never another request's answer
      end
    until not rec
    return rec, err, seen
  end

  it("an answer file that shrinks between the index and the reads is an io error, never a record", function()
    local case = make_case(dir, 6000, math.random, "shrink", 4096)
    local rec, err, seen = after_first(case, function()
      local f = assert(io.open(case.output, "rb"))
      local head = f:read(4096)
      f:close()
      f = assert(io.open(case.output, "wb"))             -- the same file, cut to 4 KB
      f:write(head)
      f:close()
    end)
    assert.are.equal(false, rec)
    assert.are.equal("io", err.kind)
    assert.matches("shrink.out.jsonl", err.message, 1, true)
    assert.matches("shorter than when it was indexed", err.message, 1, true)
    assert.is_true(seen < 6000)
  end)

  it("an answer file rewritten in another order between the index and the reads is an io error", function()
    local case = make_case(dir, 6000, math.random, "moved", 4096)
    local rec, err = after_first(case, function()
      local lines = {}
      for l in io.lines(case.output) do lines[#lines + 1] = l end
      table.sort(lines)                                     -- the same bytes, other places
      local f = assert(io.open(case.output, "wb"))
      f:write(table.concat(lines, "\n"))
      f:close()
    end)
    assert.are.equal(false, rec)
    assert.are.equal("io", err.kind)
    assert.matches("moved.out.jsonl", err.message, 1, true)
    assert.matches("changed since it was indexed", err.message, 1, true)
  end)

  it("a result file that goes away mid-way ends the iteration with an io error", function()
    local case = make_case(dir, 40, math.random, "gone")
    local r = assert(results.open({ output = case.output, errors = case.errors, inputs = case.inputs, max_index = 3 }))
    local it = r:each()
    assert.is_truthy(it())
    os.remove(case.output)
    local rec, err
    repeat rec, err = it() until not rec
    assert.are.equal(false, rec)
    assert.are.equal("io", err.kind)
    assert.matches("out.jsonl", err.message, 1, true)
    assert.is_nil(it())
  end)
end)
