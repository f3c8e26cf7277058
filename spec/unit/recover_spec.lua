-- lbatch.recover with no server: what an upload or a create whose answer
-- was lost may have made, found in a page the spec hands it.
local recover = require "lbatch.recover"
local errors = require "lbatch.errors"

local function pager(data, seen)
  return function(q)
    seen[#seen + 1] = q
    return { data = data }
  end
end

describe("lbatch.recover", function()
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
