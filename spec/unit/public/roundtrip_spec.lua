-- Round trips by property, with the suite's seeded generator (spec/gen.lua):
-- random requests through the writer, the emulator (over real HTTP) and
-- the results reader come back joined to their inputs; random CSV (quotes,
-- commas, CR, LF, CRLF, a byte-order mark, empty fields, multibyte text)
-- through csv.to_jsonl and csv.from_results comes back equal.
local H = require "helper"
local G = require "gen"
local lbatch = require "lbatch"
local jsonl = require "lbatch.jsonl"
local results = require "lbatch.results"
local csv = require "lbatch.csv"
local cjson = require "cjson"

local BOM = "\239\187\191"
local PIECES = { "a", "b", "Z", "0", " ", ",", '"', '""', "\r", "\n", "\r\n", "é", "中", "😀", "\t", "\\", "/",
                 "'", BOM, "x,y", '"q"', "{", "}" }

-- a random cell: empty, or pieces of the troublesome kinds
local function cell(g, allow_empty)
  if allow_empty and g:chance(0.15) then return "" end
  local t = {}
  for i = 1, g:int(1, 8) do t[i] = g:pick(PIECES) end
  return table.concat(t)
end

describe("round trips", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  it("CSV -> csv.to_jsonl -> results -> csv.from_results gives the same cells (property)", function()
    local g = G.new(4180)
    for case = 1, 60 do
      local rows = {}
      for i = 1, g:int(1, 12) do
        local text = cell(g)           -- a request needs content: not empty, not only blanks
        rows[i] = { ("id-%d-"):format(i) .. cell(g), text:find("%S") and text or text .. "x" }
      end
      -- the input CSV, written by hand: any field may be quoted, any row end LF or CRLF
      local out = {}
      local bom = g:chance(0.3)
      for i, r in ipairs(rows) do
        local fields = {}
        for k, v in ipairs(r) do
          local must = v:find('[,"\r\n]') or (i == 1 and k == 1 and v:sub(1, 3) == BOM)
          fields[k] = (must or g:chance(0.3)) and ('"' .. v:gsub('"', '""') .. '"') or v
        end
        out[#out + 1] = table.concat(fields, ",") .. (g:chance(0.5) and "\r\n" or "\n")
      end
      local src = H.write(dir .. "/in.csv", (bom and BOM or "") .. table.concat(out))
      local m = assert(csv.to_jsonl(src, { path = dir .. "/req.jsonl", model = "qwen-plus", header = false }))
      assert.are.equal(#rows, m.lines, "case " .. case)
      assert.is_true(assert(jsonl.validate(dir .. "/req.jsonl")).ok)
      -- an answer per request, made by hand from the request file
      local res = assert(io.open(dir .. "/out.jsonl", "wb"))
      for line in io.lines(dir .. "/req.jsonl") do
        local req = cjson.decode(line)
        res:write(cjson.encode({ id = "o", custom_id = req.custom_id, response = { status_code = 200,
          body = { choices = { { message = { content = "A:" .. req.body.messages[1].content } } } } } }), "\n")
      end
      res:close()
      local reader = assert(results.open({ output = dir .. "/out.jsonl", inputs = dir .. "/req.jsonl" }))
      local back = dir .. "/back.csv"
      local wbom = g:chance(0.5)
      assert.are.equal(#rows, assert(csv.from_results(reader, back,
        { columns = { "custom_id", "input", "content" }, bom = wbom })))
      local got = {}
      for row, err in assert(csv.rows(back)) do
        assert(row, err)
        got[#got + 1] = row
      end
      table.remove(got, 1)                                  -- the header
      local want = {}
      for i, r in ipairs(rows) do want[i] = { r[1], r[2], "A:" .. r[2] } end
      table.sort(got, function(a, b) return a[1] < b[1] end)
      table.sort(want, function(a, b) return a[1] < b[1] end)
      assert.are.same(want, got, ("case %d (seed %d)"):format(case, g.seed))
    end
  end)

  it("a first cell that starts with a byte-order mark keeps it", function()
    local w = assert(csv.writer(dir .. "/bom.csv"))
    assert(w:row({ BOM .. "id", "x" }))
    assert(w:close())
    local row = assert(csv.rows(dir .. "/bom.csv"))()
    assert.are.same({ BOM .. "id", "x" }, row)
  end)

  describe("through the emulator", function()
    local emu, client
    setup(function()
      emu = H.emulator({ speed = 400, rate_limits = false })
      client = lbatch.new({ api_key = "k", base_url = emu.base, poll_budget = 6000 })
    end)
    teardown(function()
      client:close()
      emu.stop()
    end)

    it("random requests through writer, emulator and reader come back joined to their inputs (property)", function()
      local g = G.new(3629)
      for case = 1, 4 do
        local w = jsonl.writer({ path = dir .. "/rt.jsonl", model = "qwen-plus", max_lines = g:int(3, 20) })
        local sent = {}
        for i = 1, g:int(5, 40) do
          local id = g:chance(0.2) and ('id "' .. i .. '" \\ ' .. g:text(3)) or ("r" .. i .. "-" .. g:text(g:int(1, 6)))
          local prompt = g:text(g:int(0, 30))
          sent[id] = { prompt = prompt, temperature = g:int(0, 10) / 10 }
          assert(w:chat(id, { prompt = prompt, temperature = sent[id].temperature }))
        end
        local m = assert(w:close())
        local groups, n = {}, 0
        for k, f in ipairs(m.files) do
          local b = assert(client:create({ input_file_id = assert(client:upload(f.path)).id,
                                           endpoint = "/v1/chat/completions" }))
          b = assert(client:wait(b.id, { interval = 0.05 }))
          assert.are.equal("completed", b.status)
          local out = assert(client:content(b.output_file_id, { path = ("%s/rt-out-%d.jsonl"):format(dir, k) }))
          groups[k] = { output = out, inputs = f.path }
        end
        local r = assert(results.open({ groups = groups, max_index = g:int(1, 8) }))
        local seen = {}
        for rec in r:each() do
          local want = sent[rec.custom_id]
          assert(want, "a result for a request never sent: " .. tostring(rec.custom_id))
          assert.is_nil(seen[rec.custom_id], "twice: " .. rec.custom_id)
          seen[rec.custom_id] = true
          assert.is_true(rec.ok)
          assert.are.equal(200, rec.status_code)
          assert.are.equal(want.prompt, rec.prompt, ("case %d: %q"):format(case, rec.custom_id))
          assert.are.equal("qwen-plus", rec.model)
          assert.is_string(rec.content)
          n = n + 1
        end
        local count = 0
        for _ in pairs(sent) do count = count + 1 end
        assert.are.equal(count, n, "case " .. case)
        assert.are.same({ count, count, 0 }, (function(s) return { s.total, s.ok, s.missing } end)(assert(r:summary())))
      end
    end)
  end)
end)
