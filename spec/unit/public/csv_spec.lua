-- lbatch.csv: RFC 4180 reading and writing, CSV -> requests, results -> CSV,
-- on hand-made files (no server, no nginx).
local H = require "helper"
local csv = require "lbatch.csv"
local cjson = require "cjson"

local BOM = "\239\187\191"

describe("csv", function()
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() H.rm_rf(dir) end)

  local function rows_of(text)
    local path = H.write(dir .. "/in.csv", text)
    local out = {}
    for row, err in assert(csv.rows(path)) do
      if not row then out[#out + 1] = { error = err } break end
      out[#out + 1] = row
    end
    return out
  end

  describe("rows", function()
    it("splits on commas; quoted fields hold commas, doubled quotes and newlines", function()
      assert.are.same({ { "a", "b,c", 'say "hi"', "" } }, rows_of('a,"b,c","say ""hi""",""\n'))
      assert.are.same({ { "id", "line one\nline two\r\nline three", "x" } },
                      rows_of('id,"line one\nline two\r\nline three",x\r\n'))      -- byte for byte inside quotes
    end)

    it("ends records at CRLF or LF, the last one with or without; keeps empty fields", function()
      assert.are.same({ { "a", "b" }, { "c", "d" }, { "e", "f" } }, rows_of("a,b\r\nc,d\ne,f"))
      assert.are.same({ { "a", "", "" }, { "", "" }, { "" } }, rows_of("a,,\r\n,\r\n\r\n"))
      assert.are.same({ { "a\rb", "c" } }, rows_of("a\rb,c\r\n"))                  -- a lone CR is data
      -- an empty last field after a quoted one (results' CSV: no usage) is a field
      assert.are.same({ { "a", "" }, { "b", "" }, { "x,y", "", "" } }, rows_of('"a",\r\n"b",\n"x,y",,'))
      assert.are.same({}, rows_of(""))
    end)

    it("drops a byte-order mark at the start only", function()
      assert.are.same({ { "id", "q" }, { BOM .. "x", "y" } }, rows_of(BOM .. "id,q\r\n" .. BOM .. "x,y\r\n"))
      assert.are.same({ { "\"quoted\" first" } }, rows_of(BOM .. '"""quoted"" first"\n'))
    end)

    it("an unterminated quote ends the rows with false and an invalid error at the record's first line", function()
      local out = rows_of('ok,1\nbad,"never closed\nmore\n')
      assert.are.same({ "ok", "1" }, out[1])
      local err = out[2].error
      assert.are.equal("invalid", err.kind)
      assert.are.equal("csv_unterminated_quote", err.code)
      assert.matches(":2: a quoted field is never closed", err.message, 1, true)
      assert.are.equal(2, #out)
    end)

    it("a missing file is an io error; a path that is not a string raises", function()
      local rows, err = csv.rows(dir .. "/none.csv")
      assert.is_nil(rows)
      assert.are.equal("io", err.kind)
      assert.has_error(function() csv.rows(nil) end, "lbatch.csv.rows: path must be a string (got nil)")
    end)
  end)

  describe("writer", function()
    it("quotes only what needs it, doubles quotes, ends rows with CRLF, BOM on request", function()
      assert.are.equal("plain", csv.quote("plain"))
      assert.are.equal('"a,b"', csv.quote("a,b"))
      assert.are.equal('"say ""hi"""', csv.quote('say "hi"'))
      assert.are.equal('"a\nb"', csv.quote("a\nb"))
      assert.are.equal('"a\rb"', csv.quote("a\rb"))
      assert.are.equal("", csv.quote(nil))
      assert.are.equal("12", csv.quote(12))
      local w = assert(csv.writer(dir .. "/o.csv", { bom = true }))
      assert.is_true(w:row({ "id", "text" }))
      assert.is_true(w:row({ "a", nil, "c" }, 3))
      assert.is_true(w:row({ "q", 'x,"y"' }))
      assert.are.equal(3, w:close())
      assert.are.equal(BOM .. 'id,text\r\na,,c\r\nq,"x,""y"""\r\n', H.read(dir .. "/o.csv"))
      local w2 = assert(csv.writer(dir .. "/p.csv"))
      w2:row({ "x" })
      w2:close()
      assert.are.equal("x\r\n", H.read(dir .. "/p.csv"))
    end)

    it("round-trips awkward fields through rows", function()
      local awkward = { { "comma", "a, b" }, { "quote", '"' }, { "crlf", "one\r\ntwo" }, { "lf", "\n" },
                        { "utf8", "北京 🍕" }, { "empty", "" }, { "spaces", "  padded  " }, { "mixed", 'a,"b"\n中' } }
      local w = assert(csv.writer(dir .. "/r.csv", { bom = true }))
      for _, r in ipairs(awkward) do w:row(r) end
      w:close()
      local back = {}
      for row in csv.rows(dir .. "/r.csv") do back[#back + 1] = row end
      assert.are.same(awkward, back)
    end)

    it("a file that cannot be created is an io error", function()
      local w, err = csv.writer(dir .. "/no/such/dir.csv")
      assert.is_nil(w)
      assert.are.equal("io", err.kind)
    end)
  end)

  describe("to_jsonl", function()
    local function lines_of(path)
      local t = {}
      for l in io.lines(path) do t[#t + 1] = cjson.decode(l) end
      return t
    end

    it("turns rows into chat requests: id, the user's text, the system prompt and extra parameters", function()
      local src = H.write(dir .. "/q.csv", BOM .. 'id,question\r\nq1,"Hi, there"\r\n\r\nq2,"two\nlines"\r\n')
      local m = assert(csv.to_jsonl(src, { path = dir .. "/q.jsonl", model = "qwen-plus", system = "Be brief.",
                                           temperature = 0 }))
      assert.are.equal(2, m.lines)
      local l = lines_of(dir .. "/q.jsonl")
      assert.are.equal(2, #l)
      assert.are.same({ custom_id = "q1", method = "POST", url = "/v1/chat/completions", body = {
        model = "qwen-plus", temperature = 0,
        messages = { { role = "system", content = "Be brief." }, { role = "user", content = "Hi, there" } } } }, l[1])
      assert.are.equal("two\nlines", l[2].body.messages[2].content)
      assert.is_nil(l[1].body.system)
      assert.is_nil(l[1].body.path)
    end)

    it("refuses a row without content, naming its line and row, and leaves no file to upload", function()
      local cases = {
        { "c1,hello\nc2,\n", "c.csv:2: row 2 (c2) has no content: column 2 is empty" },
        { "c1,hello\nc2,   \n", "c.csv:2: row 2 (c2) has no content: column 2 is empty" },
        { "id,question\n\nc1,\"a\nb\"\nc2,\"\"\n", "c.csv:5: row 4 (c2) has no content: the \"question\" column (2) is empty" },
        { "c1\nc2\n", "c.csv:1: row 1 has no content column: 1 cell(s), the content would be column 2" },
        { "custom_id\nc1\n", "c.csv:2: row 2 has no content column: 1 cell(s), the content would be column 2" },
        { "question,id\nhello,c1\n,c2\n", "c.csv:3: row 3 (c2) has no content: the \"question\" column (1) is empty" },
      }
      for _, case in ipairs(cases) do
        local src = H.write(dir .. "/c.csv", case[1])
        local out = dir .. "/c.jsonl"
        os.remove(out)
        for endpoint, model in pairs({ ["/v1/chat/completions"] = "qwen-plus", ["/v1/embeddings"] = "text-embedding-v4" }) do
          local m, err = csv.to_jsonl(src, { path = out, model = model, endpoint = endpoint })
          assert.is_nil(m, case[1])
          assert.are.same({ "invalid", "csv_no_content" }, { err.kind, err.code })
          assert.are.equal(dir .. "/" .. case[2], err.message:sub(1, #dir + 1 + #case[2]), case[1])
          assert.is_false(H.exists(out), case[1])
        end
      end
      -- header = false: the first row is a request, and it too needs content
      local _, err = csv.to_jsonl(H.write(dir .. "/c.csv", "id\nc1,x\n"), { path = dir .. "/c.jsonl", model = "m",
                                                                             header = false })
      assert.matches("c.csv:1: row 1 has no content column", err.message, 1, true)
    end)

    it("validate: a CSV checked as the requests it makes, a row without content a problem naming its row", function()
      local rep = assert(csv.validate(H.write(dir .. "/v.csv", "question,id\nhello,c1\n,c2\n"), { model = "qwen-plus" }))
      assert.is_false(rep.ok)
      assert.are.same({ { code = "csv_no_content", line = 3, param = "path",
                          message = 'row 3 (c2) has no content: the "question" column (1) is empty' } }, rep.problems)
      rep = assert(csv.validate(H.write(dir .. "/v.csv", "c1\nc2\n"), { model = "qwen-plus" }))
      assert.are.equal("csv_no_content", rep.problems[1].code)
      rep = assert(csv.validate(H.write(dir .. "/v.csv", "question,id\nhello,c1\nworld,c2\n"), { model = "qwen-plus" }))
      assert.are.same({ true, 2, true, "qwen-plus" }, { rep.ok, rep.lines, rep.skipped_header, rep.model })
      -- what the writer refuses is a problem too; the requests' own problems are numbered by request
      rep = assert(csv.validate(H.write(dir .. "/v.csv", "id,q\na,x\na,y\n"), { model = "qwen-plus" }))
      assert.are.equal("duplicate_custom_id", rep.problems[1].code)
      rep = assert(csv.validate(H.write(dir .. "/v.csv", "a,x\nb,y\n"), { model = "qwen-plus", region = "cn",
                                                                         endpoint = "/v1/embeddings" }))
      assert.is_false(rep.ok)
      assert.are.equal("io", select(2, csv.validate(dir .. "/none.csv", { model = "m" })).kind)
    end)

    it("recognises a header by its names in any order, and reads the columns where it names them", function()
      for _, head in ipairs({ "question,id", "Prompt,Custom_ID", "content,ID,extra", "id,category,question" }) do
        local src = H.write(dir .. "/o.csv", head .. "\n" .. (head:lower():find("^id") and "c1,x,hello\n" or "hello,c1\n"))
        local m = assert(csv.to_jsonl(src, { path = dir .. "/o.jsonl", model = "m" }))
        assert.are.same({ 1, true }, { m.lines, m.skipped_header }, head)
        local l = lines_of(dir .. "/o.jsonl")
        assert.are.same({ "c1", "hello" }, { l[1].custom_id, l[1].body.messages[1].content }, head)
        assert.is_true(csv.is_header(m.header))
      end
      assert.are.same({ 2, 1 }, { csv.columns({ "question", "id" }) })
      assert.are.same({ 1, 2 }, { csv.columns(nil) })
      assert.are.same({ 2, 1 }, { csv.columns({ "prompt" }) })
      assert.are.same({ 1, 3 }, { csv.columns({ "id", "x", "text" }) })
      -- --header with names in another order: the names still say where
      assert(csv.to_jsonl(H.write(dir .. "/o.csv", "question,id\nhello,c1\n"),
                                    { path = dir .. "/o.jsonl", model = "m", header = true }))
      assert.are.equal("c1", lines_of(dir .. "/o.jsonl")[1].custom_id)
      -- --no-header: the first row is data, first column the id
      local m = assert(csv.to_jsonl(H.write(dir .. "/o.csv", "question,id\nhello,c1\n"),
                              { path = dir .. "/o.jsonl", model = "m", header = false }))
      assert.are.same({ 2, false }, { m.lines, m.skipped_header })
      assert.are.equal("question", lines_of(dir .. "/o.jsonl")[1].custom_id)
    end)

    it("header = false reads the first row as data; embeddings take the text as input", function()
      local src = H.write(dir .. "/e.csv", "e1,hello\ne2,world\n")
      local m = assert(csv.to_jsonl(src, { path = dir .. "/e.jsonl", model = "text-embedding-v4",
                                           endpoint = "/v1/embeddings", header = false, dimensions = 512 }))
      assert.are.equal(2, m.lines)
      local l = lines_of(dir .. "/e.jsonl")
      assert.are.same({ custom_id = "e1", method = "POST", url = "/v1/embeddings",
                        body = { model = "text-embedding-v4", input = "hello", dimensions = 512 } }, l[1])
      assert.are.equal("world", l[2].body.input)
    end)

    it("sends every row of a CSV without a header: two rows, two requests", function()
      local src = H.write(dir .. "/bare2.csv", "q1,What is 2 + 2?\nq2,Name a prime.\n")
      local m = assert(csv.to_jsonl(src, { path = dir .. "/bare2.jsonl", model = "qwen-plus" }))
      assert.are.same({ 2, false }, { m.lines, m.skipped_header })
      assert.is_nil(m.header)
      local l = lines_of(dir .. "/bare2.jsonl")
      assert.are.same({ "q1", "What is 2 + 2?" }, { l[1].custom_id, l[1].body.messages[1].content })
      assert.are.equal("q2", l[2].custom_id)
      -- nor a first row whose names are not known: it is a request, counted
      src = H.write(dir .. "/kv.csv", "k,v\nq1,hello\n")
      m = assert(csv.to_jsonl(src, { path = dir .. "/kv.jsonl", model = "qwen-plus" }))
      assert.are.same({ 2, false }, { m.lines, m.skipped_header })
      assert.are.equal("k", lines_of(dir .. "/kv.jsonl")[1].custom_id)
    end)

    it("skips a first row that is a header, and says so in the manifest", function()
      for _, head in ipairs({ "custom_id,content", "id,question", "ID,Prompt", " Custom ID , text ,system",
                              "id", "qid,q", "n,question", "#,prompt,model" }) do
        local src = H.write(dir .. "/h.csv", BOM .. "\r\n" .. head .. "\r\nq1,hello\r\nq2,world\r\n")
        local m = assert(csv.to_jsonl(src, { path = dir .. "/h.jsonl", model = "qwen-plus" }))
        assert.are.same({ 2, true }, { m.lines, m.skipped_header }, head)
        local cells = {}
        for c in (head .. ","):gmatch("([^,]*),") do cells[#cells + 1] = c end
        assert.are.same(cells, m.header, head)
        assert.are.equal("q1", lines_of(dir .. "/h.jsonl")[1].custom_id, head)
      end
      assert.is_true(csv.is_header({ "custom_id", "content" }))
      assert.is_true(csv.is_header({ "x", "Question" }))
      assert.is_false(csv.is_header({ "q1", "What is an id?" }))
      assert.is_false(csv.is_header({ "" }))
      assert.are.same({ "id", "question" }, csv.header_of(H.write(dir .. "/ho.csv", "\nid,question\nq1,a\n")))
      local bare = H.write(dir .. "/b.csv", "q1,What is 2 + 2?\nq2,Name a prime.\n")
      assert.is_false(csv.header_of(bare))
      assert.are.same({ "q1", "What is 2 + 2?" }, csv.header_of(bare, true))
      assert.is_false(csv.header_of(dir .. "/ho.csv", false))
      assert.are.equal("io", select(2, csv.header_of(dir .. "/none.csv")).kind)
    end)

    it("header = true skips any first row; header = false keeps a header as a request", function()
      local bare = H.write(dir .. "/f.csv", "x,hello\ny,world\n")
      local m = assert(csv.to_jsonl(bare, { path = dir .. "/f.jsonl", model = "qwen-plus", header = true }))
      assert.are.same({ 1, true, { "x", "hello" } }, { m.lines, m.skipped_header, m.header })
      assert.are.equal("y", lines_of(dir .. "/f.jsonl")[1].custom_id)
      local headed = H.write(dir .. "/k.csv", "id,question\nx,hello\n")
      m = assert(csv.to_jsonl(headed, { path = dir .. "/k.jsonl", model = "qwen-plus", header = false }))
      assert.are.same({ 2, false }, { m.lines, m.skipped_header })
      local l = lines_of(dir .. "/k.jsonl")
      assert.are.same({ "id", "question" }, { l[1].custom_id, l[1].body.messages[1].content })
      assert.has_error(function() csv.to_jsonl(headed, { path = dir .. "/k.jsonl", model = "m", header = "yes" }) end,
                       "lbatch.csv.to_jsonl: opts.header must be a boolean (got string)")
    end)

    it("fails on the first bad row (a duplicate id, an unterminated quote) and on a missing file", function()
      local m, err = csv.to_jsonl(H.write(dir .. "/d.csv", "id,q\nq1,a\nq1,b\n"), { path = dir .. "/d.jsonl",
                                                                                 model = "qwen-plus" })
      assert.is_nil(m)
      assert.are.equal("duplicate_custom_id", err.code)
      m, err = csv.to_jsonl(H.write(dir .. "/u.csv", 'id,q\nq1,"open\n'), { path = dir .. "/u.jsonl", model = "qwen-plus" })
      assert.is_nil(m)
      assert.are.equal("csv_unterminated_quote", err.code)
      m, err = csv.to_jsonl(dir .. "/none.csv", { path = dir .. "/n.jsonl", model = "qwen-plus" })
      assert.is_nil(m)
      assert.are.equal("io", err.kind)
      assert.has_error(function() csv.to_jsonl(dir .. "/none.csv", { path = dir .. "/n.jsonl" }) end,
                       "lbatch.csv.to_jsonl: opts.model must be a string (got nil)")
    end)
  end)

  describe("from_results", function()
    local function results_files()
      local out = H.write(dir .. "/out.jsonl", table.concat({
        cjson.encode({ id = "o1", custom_id = "q1", response = { status_code = 200, request_id = "r-1", body = {
          model = "qwen-plus", created = 1712345678, choices = { { message = { content = 'Yes, "of course"\nbye' } } },
          usage = { prompt_tokens = 12, completion_tokens = 5, total_tokens = 17 } } }, error = cjson.null }),
        cjson.encode({ id = "o2", custom_id = "emb", response = { status_code = 200, request_id = "r-2", body = {
          model = "text-embedding-v4", data = { { embedding = { 0.1, 0.2, 0.3 } } } } } }),
      }, "\n") .. "\n")
      local errs = H.write(dir .. "/err.jsonl", cjson.encode({ id = "e1", custom_id = "q2", response = cjson.null,
        error = { code = "batch_expired", message = "not run, expired" } }) .. "\n")
      return out, errs
    end

    it("writes one row per result, under the default columns", function()
      local out, errs = results_files()
      local n = assert(csv.from_results({ output = out, errors = errs }, dir .. "/r.csv"))
      assert.are.equal(3, n)
      local rows = {}
      for row in csv.rows(dir .. "/r.csv") do rows[#rows + 1] = row end
      assert.are.same(csv.COLUMNS, rows[1])
      assert.are.same({ "custom_id", "model", "request_id", "status_code", "error_code", "error_message",
                        "created", "content", "usage" }, rows[1])
      local by = {}
      for i = 2, #rows do by[rows[i][1]] = rows[i] end
      assert.are.same({ "q1", "qwen-plus", "r-1", "200", "", "", "1712345678", 'Yes, "of course"\nbye', "12/5/17" }, by.q1)
      assert.are.same({ "emb", "text-embedding-v4", "r-2", "200", "", "", "", "3 dimensions", "" }, by.emb)
      assert.are.same({ "q2", "", "", "", "batch_expired", "not run, expired", "", "", "" }, by.q2)
      assert.are.equal(4, #rows)
      assert.are.equal("custom_id,", H.read(dir .. "/r.csv"):sub(1, 10))       -- no BOM unless asked
    end)

    it("takes chosen columns, a header of its own, a BOM, and an open reader", function()
      local out = results_files()
      local reader = assert(require("lbatch.results").open({ output = out }))
      local n = assert(csv.from_results(reader, dir .. "/c.csv", { bom = true, columns = { "custom_id", "usage" },
                                                                   header = { "ID", "Tokens" } }))
      assert.are.equal(2, n)
      local text = H.read(dir .. "/c.csv")
      assert.are.equal(BOM .. "ID,Tokens\r\n", text:sub(1, 3 + #"ID,Tokens\r\n"))
      assert.matches("\r\nq1,12/5/17\r\n", text, 1, true)
    end)

    it("fails as io, leaving no CSV, when a results file is missing", function()
      local n, err = csv.from_results({ output = dir .. "/none.jsonl" }, dir .. "/x.csv")
      assert.is_nil(n)
      assert.are.equal("io", err.kind)
      assert.is_false(H.exists(dir .. "/x.csv"))
    end)
  end)
end)
