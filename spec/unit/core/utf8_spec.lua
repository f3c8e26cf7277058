-- Every class of malformed UTF-8 (RFC 3629, table 3-7 of the Unicode
-- standard) through the three doors a user's bytes come in by: the core's
-- scanner, `jsonl.validate` on a file made elsewhere and the writer (`add`
-- and `line`). Each is refused with `invalid_utf8` and the offset of the
-- first bad byte; the largest and smallest valid form of each length
-- beside it is accepted, so that a rule relaxed or tightened by one shows.
local H = require "helper"
local core = require "lbatch.core"
local jsonl = require "lbatch.jsonl"

local BAD = {
  { "a lone continuation byte", "\128" },
  { "a continuation byte at the end of the range", "\191" },
  { "two continuation bytes", "\128\128" },
  { "C0: an overlong ASCII", "\192\175" },
  { "C1: an overlong ASCII", "\193\191" },
  { "an overlong three-byte NUL", "\224\128\128" },
  { "an overlong three-byte U+07FF", "\224\159\191" },
  { "an overlong four-byte U+FFFF", "\240\143\191\191" },
  { "an overlong four-byte NUL", "\240\128\128\128" },
  { "the first surrogate U+D800", "\237\160\128" },
  { "the last surrogate U+DFFF", "\237\191\191" },
  { "a surrogate pair written as two", "\237\160\189\237\184\128" },
  { "past U+10FFFF: U+110000", "\244\144\128\128" },
  { "past U+10FFFF: F5", "\245\128\128\128" },
  { "past U+10FFFF: F7", "\247\191\191\191" },
  { "a five-byte form", "\248\136\128\128\128" },
  { "a six-byte form", "\252\132\128\128\128\128" },
  { "FE", "\254" },
  { "FF", "\255" },
  { "a two-byte sequence cut short", "\195" },
  { "a three-byte sequence cut after one", "\228" },
  { "a three-byte sequence cut after two", "\228\184" },
  { "a four-byte sequence cut after three", "\240\159\152" },
  { "a two-byte lead before ASCII", "\195A" },
  { "a three-byte lead, its second byte ASCII", "\228\184A" },
  { "a four-byte lead, its third byte ASCII", "\240\159A\128" },
  { "a four-byte lead, its last byte ASCII", "\240\159\152A" },
  { "a lead byte followed by a lead byte", "\195\195\169" },
}

local GOOD = {
  { "U+0080, the smallest two-byte", "\194\128" },
  { "U+07FF, the largest two-byte", "\223\191" },
  { "U+0800, the smallest three-byte", "\224\160\128" },
  { "U+D7FF, just below the surrogates", "\237\159\191" },
  { "U+E000, just above the surrogates", "\238\128\128" },
  { "U+FFFF, the largest three-byte", "\239\191\191" },
  { "U+10000, the smallest four-byte", "\240\144\128\128" },
  { "U+10FFFF, the largest code point", "\244\143\191\191" },
  { "U+FFFD", "\239\191\189" },
}

-- a request line whose content holds `bytes` after `pre`
local PRE = '{"custom_id":"u1","method":"POST","url":"/v1/chat/completions","body":{"model":"qwen-plus",'
  .. '"messages":[{"role":"user","content":"ok '
local function line_with(bytes) return PRE .. bytes .. ' end"}]}}' end

describe("UTF-8", function()
  local dir
  setup(function() dir = H.tmpdir() end)

  for _, case in ipairs(BAD) do
    local name, bytes = case[1], case[2]
    it("refuses " .. name .. " everywhere, at its first bad byte", function()
      local text = line_with(bytes)
      local at = #PRE + 1                         -- after "ok ": the bad byte
      assert.are.equal(at, core.utf8_check(text))
      assert.are.equal(1, core.utf8_check(bytes))
      -- validate, on a file made elsewhere
      local path = H.write(dir .. "/bad.jsonl", text .. "\n")
      local rep = assert(jsonl.validate(path))
      assert.is_false(rep.ok)
      assert.are.equal(1, #rep.problems)
      assert.are.equal("invalid_utf8", rep.problems[1].code)
      assert.are.equal(1, rep.problems[1].line)
      assert.are.equal(at, rep.problems[1].offset)
      assert.matches("byte " .. at, rep.problems[1].message)
      -- the writer: a line as it is, and a request built from a table
      local w = jsonl.writer({ path = dir .. "/w.jsonl", model = "qwen-plus" })
      local ok, err = w:line(text)
      assert.is_nil(ok)
      assert.are.equal("invalid_utf8", err.code)
      ok, err = w:chat("u2", { prompt = "ok " .. bytes .. " end" })
      assert.is_nil(ok)
      assert.are.equal("invalid_utf8", err.code)
      assert.matches('custom_id "u2"', err.message)
      ok, err = w:chat("id-" .. bytes, { prompt = "fine" })        -- in the custom_id too
      assert.is_nil(ok)
      assert.are.equal("invalid_utf8", err.code)
      assert(w:chat("u3", { prompt = "fine" }))
      local m = assert(w:close())
      assert.are.equal(1, m.lines)                                  -- only the good one was written
      assert.is_true(assert(jsonl.validate(m.files[1].path)).ok)
    end)
  end

  it("accepts the first and last code point of every length and range", function()
    for _, case in ipairs(GOOD) do
      local text = line_with(case[2])
      assert.is_nil(core.utf8_check(text), case[1])
      assert.is_nil(core.utf8_check(case[2]), case[1])
      local rep = assert(jsonl.validate(H.write(dir .. "/good.jsonl", text .. "\n")))
      assert.is_true(rep.ok, case[1])
      local w = jsonl.writer({ path = dir .. "/wg.jsonl", model = "qwen-plus" })
      assert(w:line(text), case[1])
      assert(w:chat("g2", { prompt = case[2] }), case[1])
      assert.are.equal(2, assert(w:close()).lines)
    end
  end)

  it("finds the first bad byte after valid multibyte text, also at the very end", function()
    local good = "中文😀é"
    assert.are.equal(#good + 1, core.utf8_check(good .. "\237\160\128"))
    assert.are.equal(#good + 1, core.utf8_check(good .. "\240\159\152"))   -- cut at the end of the input
    assert.are.equal(#good + 1, core.utf8_check(good .. "\195"))
    assert.is_nil(core.utf8_check(good))
    assert.is_nil(core.utf8_check(""))
  end)
end)
