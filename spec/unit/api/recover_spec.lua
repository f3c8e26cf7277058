-- lbatch.recover with no server: what an upload or a create whose answer
-- was lost may have made, found in a page the spec hands it.
local recover = require "lbatch.impl.api.recover"
local errors = require "lbatch.impl.transport.errors"

local function pager(data, seen)
  return function(q)
    seen[#seen + 1] = q
    return { data = data }
  end
end

describe("lbatch.impl.api.recover", function()
  it("finds the upload by name, and by size and age when given them", function()
    local seen = {}
    local list = pager({
      { id = "file-new", filename = "a.jsonl", bytes = 10, created_at = 200 },
      { id = "file-old", filename = "a.jsonl", bytes = 12, created_at = 100 },
    }, seen)
    assert.are.equal("file-new", recover.upload(list, { filename = "a.jsonl" }).id)
    assert.are.equal("file-old", recover.upload(list, { filename = "a.jsonl", bytes = 12 }).id)
    assert.is_nil(recover.upload(list, { filename = "a.jsonl", bytes = 12, since = 150 }))
    assert.is_nil(recover.upload(list, { filename = "b.jsonl" }))
    assert.are.same({ limit = 100, order = "desc" }, seen[1])
  end)

  it("finds the batch by input file, and by endpoint, exact metadata and age when given them", function()
    local seen = {}
    local list = pager({
      { id = "b1", input_file_id = "f1", endpoint = "/v1/embeddings", metadata = { run = "x" }, created_at = 300 },
      { id = "b2", input_file_id = "f1", endpoint = "/v1/chat/completions", created_at = 200 },
      { id = "b3", input_file_id = "f1", endpoint = "/v1/chat/completions", metadata = { run = "x", k = "1" },
        created_at = 100 },
    }, seen)
    assert.are.equal("b1", recover.batch(list, { input_file_id = "f1" }).id)
    assert.are.same({ "f1" }, seen[1].input_file_ids)
    local want = { input_file_id = "f1", endpoint = "/v1/chat/completions" }
    want.metadata = {}                                  -- none: only a batch with none
    assert.are.equal("b2", recover.batch(list, want).id)
    want.metadata = { run = "x" }                        -- a subset is not the same
    assert.is_nil(recover.batch(list, want))
    want.metadata = { run = "x", k = "1" }
    assert.are.equal("b3", recover.batch(list, want).id)
    want.since = 150
    assert.is_nil(recover.batch(list, want))
    want.since = 100                                    -- made in the very second the create began
    assert.are.equal("b3", recover.batch(list, want).id)
    want.since = 101
    assert.is_nil(recover.batch(list, want))
    assert.is_nil(recover.batch(list, { input_file_id = "f2" }))
  end)

  it("matches by stamps alone: a created_at far in the past or the future is found all the same", function()
    local seen = {}
    local list = pager({
      { id = "file-future", filename = "r-1.jsonl", bytes = 10, created_at = 4102444800 },   -- 2100
      { id = "file-past", filename = "r-2.jsonl", bytes = 10, created_at = 0 },
      { id = "b-future", input_file_id = "f1", endpoint = "/v1/chat/completions",
        metadata = { lbatch_run = "r", lbatch_shard = "1" }, created_at = 4102444800 },
      { id = "b-past", input_file_id = "f2", endpoint = "/v1/chat/completions",
        metadata = { lbatch_run = "r", lbatch_shard = "2" }, created_at = 0 },
    }, seen)
    assert.are.equal("file-future", recover.upload(list, { filename = "r-1.jsonl", bytes = 10 }).id)
    assert.are.equal("file-past", recover.upload(list, { filename = "r-2.jsonl", bytes = 10 }).id)
    local want = { endpoint = "/v1/chat/completions", metadata = { lbatch_run = "r", lbatch_shard = "1" } }
    want.input_file_id = "f1"
    assert.are.equal("b-future", recover.batch(list, want).id)
    want.input_file_id, want.metadata.lbatch_shard = "f2", "2"
    assert.are.equal("b-past", recover.batch(list, want).id)
    -- and the module reads no clock of its own
    local time, clock = os.time, os.clock
    os.time = function() error("recover read os.time") end            -- luacheck: ignore 122
    os.clock = function() error("recover read os.clock") end          -- luacheck: ignore 122
    local ok, err = pcall(function()
      assert.are.equal("file-past", recover.upload(list, { filename = "r-2.jsonl", bytes = 10 }).id)
      assert.are.equal("b-past", recover.batch(list, want).id)
    end)
    os.time, os.clock = time, clock                                   -- luacheck: ignore 122
    assert(ok, err)
  end)

  it("looks again over the window until the object appears, and no longer", function()
    local t, looks, slept = 0, 0, {}
    local clock = function() return t end
    local sleep = function(s) slept[#slept + 1] = s t = t + s end
    -- made on the fourth look
    local v = recover.within(function()
      looks = looks + 1
      if looks == 4 then return { id = "late" } end
    end, 10, sleep, clock)
    assert.are.same({ "late", 4, { 1, 1, 1 } }, { v.id, looks, slept })
    -- never made: looked for the whole window, the last look at its end
    t, looks, slept = 0, 0, {}
    v = recover.within(function() looks = looks + 1 end, 2.5, sleep, clock, 1)
    assert.is_nil(v)
    assert.are.same({ 4, { 1, 1, 0.5 }, 2.5 }, { looks, slept, t })
    -- a window of 0: one look
    t, looks = 0, 0
    assert.is_nil(recover.within(function() looks = looks + 1 end, 0, sleep, clock))
    assert.are.equal(1, looks)
    -- a failure to look ends it at once
    local e = errors.new({ kind = "network", message = "reset" })
    looks = 0
    local _, err = recover.within(function() looks = looks + 1 return nil, e end, 10, sleep, clock)
    assert.are.same({ e, 1 }, { err, looks })
  end)

  it("returns the list's error when it cannot look", function()
    local e = errors.new({ kind = "network", message = "reset" })
    local failing = function() return nil, e end
    local v, err = recover.upload(failing, { filename = "a" })
    assert.is_nil(v)
    assert.are.equal(e, err)
    v, err = recover.batch(failing, { input_file_id = "f" })
    assert.is_nil(v)
    assert.are.equal(e, err)
  end)
end)

describe("lbatch.errors protect and try", function()
  it("returns what try throws, and lets a programming error go on up", function()
    local e = errors.new({ kind = "io", message = "disk" })
    local f = errors.protect(function(x)
      local v = errors.try(x, e)
      return v, "second"
    end)
    assert.are.same({ 1, "second" }, { f(1) })
    local v, err = f(nil)
    assert.is_nil(v)
    assert.are.equal(e, err)
    v, err = f(false)
    assert.is_nil(v)
    assert.are.equal(e, err)
    local g = errors.protect(function() error("a bug") end)
    assert.has_error(g, "a bug")
    local h = errors.protect(function() errors.throw("plain message") end)
    assert.are.same({ nil, "plain message" }, { h() })
  end)

  it("boxes a value to raise later, and tells a box from anything else", function()
    local box = errors.box("x")
    assert.are.equal("x", errors.thrown(box))
    assert.is_nil(errors.thrown("x"))
    assert.is_nil(errors.thrown({ "x" }))
    local ok, raised = pcall(errors.throw, 42)
    assert.is_false(ok)
    assert.are.equal(42, errors.thrown(raised))
  end)
end)
