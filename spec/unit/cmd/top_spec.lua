-- lbatch.top with no server and no terminal: a job's figures, the frame
-- it draws at 80 columns, and the keys (sort, filter, select, cancel).
local top = require "lbatch.cmd.top"

local NOW = 1000000
local function batch(id, status, total, done, failed, age)
  return { id = id, status = status, created_at = NOW - age, in_progress_at = NOW - age,
           request_counts = { total = total, completed = done, failed = failed } }
end

describe("lbatch.cmd.top", function()
  it("works out a job's rate and time left from its progress so far", function()
    local f = top.figures(batch("b1", "in_progress", 100, 40, 10, 50), NOW)
    assert.are.same({ 100, 40, 10, 50 }, { f.total, f.done, f.failed, f.age })
    assert.are.equal(1, f.rate)                       -- 50 requests in 50 s
    assert.are.equal(50, f.eta)
    assert.is_nil(top.figures(batch("b2", "validating", 100, 0, 0, 5), NOW).eta)
    assert.are.equal(0, top.figures(batch("b3", "completed", 10, 10, 0, 5), NOW).eta)
  end)

  it("shows the account's request rate over the last 30 s, not since it started", function()
    local st = top.state()
    -- 10 requests in the first 10 s, 90 in the next 30, then 1000 in 10 s
    for _, at in ipairs({ { 0, 0 }, { 10, 10 }, { 40, 100 }, { 50, 1100 } }) do
      top.update(st, { batch("batch_aaa", "in_progress", 5000, at[2], 0, 60) }, NOW + at[1])
    end
    local text = table.concat(top.frame(st, 80, 20, NOW + 50), "\n")
    assert.matches("1100/5000 done, 0 failed, 100.0/s", text, 1, true)
  end)

  it("draws a frame of at most its height, none wider than 80 columns, with the totals and a row a job", function()
    local st = top.state()
    top.update(st, { batch("batch_aaa", "in_progress", 100, 50, 0, 60), batch("batch_bbb", "completed", 10, 9, 1, 600),
                     batch("batch_ccc", "validating", 5, 0, 0, 1) }, NOW)
    local lines = top.frame(st, 80, 20, NOW)
    assert.is_true(#lines <= 20)
    local text = table.concat(lines, "\n")
    for _, l in ipairs(lines) do assert.is_true(#l <= 80, l) end
    for _, id in ipairs({ "batch_aaa", "batch_bbb", "batch_ccc" }) do assert.matches(id, text, 1, true) end
    assert.matches("in_progress", text, 1, true)
    assert.is_true(#top.frame(st, 80, 4, NOW) <= 4)
  end)

  it("sorts, filters by status, moves the selection and cancels only after y", function()
    local st = top.state()
    top.update(st, { batch("batch_aaa", "in_progress", 100, 50, 0, 60), batch("batch_bbb", "completed", 10, 10, 0, 600) },
      NOW)
    top.frame(st, 80, 20, NOW)
    local cancelled = {}
    local function cancel(id) cancelled[#cancelled + 1] = id return { id = id, status = "cancelling" } end
    top.key(st, "f", cancel)                          -- the first status present
    local shown = top.frame(st, 80, 20, NOW)
    local n = 0
    for _, l in ipairs(shown) do if l:find("batch_", 1, true) then n = n + 1 end end
    assert.are.equal(1, n)
    top.key(st, "f", cancel) top.key(st, "f", cancel)   -- back to all
    top.frame(st, 80, 20, NOW)
    local first = st.rows[st.selected].id
    top.key(st, "c", cancel)
    top.key(st, "n", cancel)                          -- kept
    assert.are.same({}, cancelled)
    top.key(st, "c", cancel)
    top.key(st, "y", cancel)
    assert.are.same({ first }, cancelled)
    top.key(st, "j", cancel)
    assert.are.equal(2, st.selected)
    top.key(st, "k", cancel) top.key(st, "k", cancel)
    assert.are.equal(1, st.selected)
    local before = st.sort
    top.key(st, "s", cancel)
    assert.are_not.equal(before, st.sort)
    assert.are.equal("quit", top.key(st, "q", cancel))
  end)

  it("totals failures by code (error files read, a failed job's errors) and tokens and cost so far", function()
    local st = top.state({ prices = { ["qwen-plus"] = { input = 2, output = 8 } } })
    local done = batch("batch_aaa", "completed", 10, 7, 3, 60)
    done.usage = { input_tokens = 1000000, output_tokens = 500000, total_tokens = 1500000 }
    local refused = batch("batch_bbb", "failed", 0, 0, 0, 30)
    refused.errors = { data = { { code = "token_limit_exceeded", message = "too many" } } }
    st.models = { batch_aaa = "qwen-plus" }
    st.codes = { emulated_failure = 2 }
    top.update(st, { done, refused }, NOW)
    local text = table.concat(top.frame(st, 80, 20, NOW), "\n")
    -- 2 of the 3 failed requests have a code from the error files; 1 not read
    assert.matches("failures: 2 emulated_failure, 1 token_limit_exceeded %(job%), 1 in error files", text)
    -- (1M x 2 + 0.5M x 8) / 1M x 0.5
    assert.matches("tokens 1500000, cost 3.0000", text, 1, true)
    local none = top.state()
    top.update(none, { batch("batch_ccc", "in_progress", 5, 1, 0, 5) }, NOW)
    local plain = table.concat(top.frame(none, 80, 20, NOW), "\n")
    assert.matches("failures: none", plain, 1, true)
    assert.is_nil(plain:find("cost", 1, true))
  end)

  it("a shard with no batch yet is a row that cannot be cancelled", function()
    local st = top.state()
    top.update(st, { { id = "run-4.jsonl", status = "written", shard = true, request_counts = { total = 5 } } }, NOW)
    top.frame(st, 80, 20, NOW)
    local called = false
    top.key(st, "c", function() called = true end)
    assert.is_false(called)
    assert.matches("has no batch yet", st.message, 1, true)
  end)
end)

-- A cancel spends the job's work: only y confirms it. Every other key (each
-- byte, Y and Enter among them, and the arrows) keeps the job, and the key
-- after a refusal is an ordinary key again.
describe("lbatch.top's cancel confirmation", function()
  local function selected_state()
    local st = top.state()
    top.update(st, { batch("batch_aaa", "in_progress", 100, 50, 0, 60) }, NOW)
    top.frame(st, 80, 20, NOW)
    return st
  end

  it("is given by y alone", function()
    local keys = { "up", "down" }
    for b = 0, 255 do keys[#keys + 1] = string.char(b) end
    for _, k in ipairs(keys) do
      local st, cancelled = selected_state(), 0
      local function cancel() cancelled = cancelled + 1 return { id = "batch_aaa", status = "cancelling" } end
      top.key(st, "c", cancel)
      assert.matches("y to confirm", st.message, 1, true)
      assert.is_nil(top.key(st, k, cancel))                    -- not even q or ^C quits from the question
      if k == "y" then
        assert.are.equal(1, cancelled)
        assert.are.equal("cancel batch_aaa: cancelling", st.message)
      else
        assert.are.equal(0, cancelled, ("key %q cancelled"):format(k))
        assert.are.equal("kept batch_aaa", st.message)
        assert.is_nil(st.confirm)
        top.key(st, "y", cancel)                                -- a y later, unasked, is no confirmation
        assert.are.equal(0, cancelled)
      end
    end
  end)

  it("draws nothing on a terminal of no rows, and the message line alone on one row", function()
    local st = selected_state()
    assert.are.same({}, top.frame(st, 80, 0, NOW))
    assert.are.same({}, top.frame(st, 0, 0, NOW))
    st.message = "hello"
    assert.are.same({ "hello" }, top.frame(st, 80, 1, NOW))
  end)
end)
