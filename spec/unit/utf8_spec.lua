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
  { "a lone continuation byte", "\x80" },
  { "a continuation byte at the end of the range", "\xBF" },
  { "two continuation bytes", "\x80\x80" },
  { "C0: an overlong ASCII", "\xC0\xAF" },
  { "C1: an overlong ASCII", "\xC1\xBF" },
  { "an overlong three-byte NUL", "\xE0\x80\x80" },
  { "an overlong three-byte U+07FF", "\xE0\x9F\xBF" },
  { "an overlong four-byte U+FFFF", "\xF0\x8F\xBF\xBF" },
  { "an overlong four-byte NUL", "\xF0\x80\x80\x80" },
  { "the first surrogate U+D800", "\xED\xA0\x80" },
  { "the last surrogate U+DFFF", "\xED\xBF\xBF" },
  { "a surrogate pair written as two", "\xED\xA0\xBD\xED\xB8\x80" },
  { "past U+10FFFF: U+110000", "\xF4\x90\x80\x80" },
  { "past U+10FFFF: F5", "\xF5\x80\x80\x80" },
  { "past U+10FFFF: F7", "\xF7\xBF\xBF\xBF" },
  { "a five-byte form", "\xF8\x88\x80\x80\x80" },
  { "a six-byte form", "\xFC\x84\x80\x80\x80\x80" },
  { "FE", "\xFE" },
  { "FF", "\xFF" },
  { "a two-byte sequence cut short", "\xC3" },
  { "a three-byte sequence cut after one", "\xE4" },
  { "a three-byte sequence cut after two", "\xE4\xB8" },
  { "a four-byte sequence cut after three", "\xF0\x9F\x98" },
  { "a two-byte lead before ASCII", "\xC3A" },
  { "a three-byte lead, its second byte ASCII", "\xE4\xB8A" },
  { "a four-byte lead, its third byte ASCII", "\xF0\x9FA\x80" },
  { "a four-byte lead, its last byte ASCII", "\xF0\x9F\x98A" },
  { "a lead byte followed by a lead byte", "\xC3\xC3\xA9" },
}

local GOOD = {
  { "U+0080, the smallest two-byte", "\xC2\x80" },
  { "U+07FF, the largest two-byte", "\xDF\xBF" },
  { "U+0800, the smallest three-byte", "\xE0\xA0\x80" },
  { "U+D7FF, just below the surrogates", "\xED\x9F\xBF" },
  { "U+E000, just above the surrogates", "\xEE\x80\x80" },
  { "U+FFFF, the largest three-byte", "\xEF\xBF\xBF" },
  { "U+10000, the smallest four-byte", "\xF0\x90\x80\x80" },
  { "U+10FFFF, the largest code point", "\xF4\x8F\xBF\xBF" },
  { "U+FFFD", "\xEF\xBF\xBD" },
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
    assert.are.equal(#good + 1, core.utf8_check(good .. "\xED\xA0\x80"))
    assert.are.equal(#good + 1, core.utf8_check(good .. "\xF0\x9F\x98"))   -- cut at the end of the input
    assert.are.equal(#good + 1, core.utf8_check(good .. "\xC3"))
    assert.is_nil(core.utf8_check(good))
    assert.is_nil(core.utf8_check(""))
  end)
end)
