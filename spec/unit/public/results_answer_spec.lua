-- idmap:answer, the join's step for one input line in one call to C
-- (lbatch/core/rec.c): the id read from the request line, taken from the
-- index, the answer's line read from its file and scanned; over real files.
local H = require "helper"
local core = require "lbatch.core"

local SPAN = 2 ^ 36
local ok_line = '{"id":"batch_req_1","custom_id":"r1","response":{"status_code":200,"request_id":"req-1","body":'
  .. '{"model":"qwen-plus","choices":[{"index":0,"message":{"role":"assistant","content":"four"}}],'
  .. '"usage":{"prompt_tokens":2,"completion_tokens":1,"total_tokens":3}}},"error":null}'
local err_line = '{"custom_id":"r2","response":{"status_code":400,"body":{"error":{"code":"bad","message":"no"}}},'
  .. '"error":{"code":"bad","message":"no"}}'
local odd_line = '{"custom_id":"r3","response":{"status_code":200,"body":{"choices":{"a":1}}},"error":null}'

local function request(id) return ('{"custom_id":"%s","method":"POST","body":{}}'):format(id) end

describe("idmap:answer", function()
  local dir, out, errs, found, handles
  before_each(function()
    dir = H.tmpdir()
    out, errs = dir .. "/out.jsonl", dir .. "/err.jsonl"
    H.write(out, ("x"):rep(3000) .. "\n" .. ok_line .. "\r\n" .. odd_line .. "\n")
    H.write(errs, err_line .. "\n")
    found = core.idmap()
    assert(found:scan(out, 1))
    assert(found:scan(errs, 2))
    handles = { assert(io.open(out, "rb")), assert(io.open(errs, "rb")) }
  end)
  after_each(function()
    for _, h in ipairs(handles) do io.close(h) end
    found:clear()
  end)

  it("gives the answer's line and core.result's fields, and takes the id from the index", function()
    local line, rec, err, berr = found:answer(request("r1"), handles)
    assert.are.equal(ok_line, line)                          -- past a long first line, without its \r
    local want = { core.result(ok_line) }
    assert.are.same(want[1], rec)
    assert.are.equal(want[2], err)
    assert.are.equal(want[3], berr)
    assert.is_true(rec.ok)
    assert.are.equal("four", rec.content)
    assert.is_nil(found:get("r1"))
    -- taken: a second request for it is missing
    assert.are.same({ nil, "r1" }, { found:answer(request("r1"), handles) })
  end)

  it("reads from the file the index names (the errors file) and gives its error fields", function()
    local line, rec, err = found:answer(request("r2"), handles)
    assert.are.equal(err_line, line)
    assert.is_false(rec.ok)
    assert.are.equal(400, rec.status_code)
    assert.are.equal("bad", err.code)
  end)

  it("gives false beside the line when the scanner leaves it to Lua, nil and the id when missing", function()
    local line, rec = found:answer(request("r3"), handles)
    assert.are.equal(odd_line, line)
    assert.is_false(core.result(odd_line))
    assert.is_false(rec)
    assert.are.same({ nil, "nope" }, { found:answer(request("nope"), handles) })
  end)

  it("gives false for an id it cannot read cheaply, and leaves the index alone", function()
    assert.is_false(found:answer('{"custom_id":"r\\u0031","body":{}}', handles))
    assert.is_false(found:answer('{"method":"POST"}', handles))
    assert.are.equal(1 * SPAN + 3001, found:get("r1"))
  end)

  it("reads an answer longer than its first read whole", function()
    local long = '{"custom_id":"big","response":{"status_code":200,"body":{"choices":[{"message":{"content":"'
      .. ("y"):rep(10000) .. '"}}]}},"error":null}'
    local path = dir .. "/big.jsonl"
    H.write(path, ok_line .. "\n" .. long .. "\n")
    local m = core.idmap()
    assert(m:scan(path, 1))
    local fh = assert(io.open(path, "rb"))
    local line, rec = m:answer(request("big"), { fh })
    fh:close()
    m:clear()
    assert.are.equal(long, line)
    assert.are.equal(("y"):rep(10000), rec.content)
  end)

  it("raises on a closed file", function()
    io.close(handles[1])
    handles[1] = assert(io.open(out, "rb"))
    local closed = assert(io.open(out, "rb"))
    io.close(closed)
    assert.has_error(function() found:answer(request("r1"), { closed }) end)
  end)
end)
