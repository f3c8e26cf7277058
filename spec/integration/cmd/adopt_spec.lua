-- lbatch adopt is exact: a run that never existed is an error, and a run
-- sharded otherwise than adopt was told is adopted as it was made (its
-- shards' lines read from the account) or refused, naming the option.
-- Through bin/lbatch on the emulator.
local H = require "helper"

local CHAT = { url = "/v1/chat/completions", model = "qwen-plus" }

local function lbatch(emu, args) return H.lbatch(args, { emu = emu }) end

local function routes(emu) return emu.stats().routes or {} end

describe("lbatch adopt", function()
  local emu, dir
  setup(function()
    emu = H.emulator({ speed = 400, rate_limits = false })
    dir = H.tmpdir()
  end)
  teardown(function() emu.stop() end)

  it("of a run that never existed: an error, exit 1, no journal", function()
    local input = H.requests(dir .. "/none.jsonl", 2, CHAT)
    local code, out, err = lbatch(emu, ("adopt %s --run deadbeef0000 --dir %s/none"):format(input, dir))
    assert.are.equal(1, code, out .. err)
    assert.matches("^lbatch adopt: .*no file .* and no batch .* of run deadbeef0000", err)
    assert.are.equal("", out)
    assert.is_false(H.exists(dir .. "/none/journal.jsonl"))
  end)

  it("run says its id; a --max-lines 2 run is adopted as it was made, or refused naming the option", function()
    local input = H.requests(dir .. "/four.jsonl", 4, CHAT)
    local work = dir .. "/four"
    -- the run's batches are held: killed while they wait, its journal lost
    local function modes(m) H.json("POST", emu.url .. "/_emulator/modes", { json = m }) end
    modes({ hold = { status = "validating", seconds = 1e6 } })
    local cmd = ("env DASHSCOPE_API_KEY=k LBATCH_BASE_URL=%s %s %s/bin/lbatch run %s --dir %s --max-lines 2 "
      .. "--poll 0.05"):format(emu.base, H.lua, H.root, input, work)
    local logf = dir .. "/four.log"
    H.ok(("(%s >%s 2>&1 & echo $! > %s.pid) &"):format(cmd, logf, logf))
    -- killed once both batches are made, not once both creates are seen: a
    -- create the kill cut off after its headers would be seen and make
    -- nothing (adopt would find one batch; the next run would make it)
    local created = 0
    H.await(function()
      created = H.made(emu).nbatches
      return created >= 2
    end, 30, 0.025)
    assert.are.equal(2, created)
    local run = (H.read(logf) or ""):match("lbatch: run (%x+) in ")
    assert.is_not_nil(run, H.read(logf))
    H.ok("kill -9 $(cat " .. logf .. ".pid)")
    os.remove(work .. "/journal.jsonl")
    -- told another --max-lines: refused, naming it and what the run's shards hold
    local code, out, err = lbatch(emu, ("adopt %s --run %s --dir %s --max-lines 3"):format(input, run, work))
    assert.are.equal(1, code, out .. err)
    assert.matches("adopt_mismatch.*its shards hold 2 lines.*%-%-max%-lines", err)
    assert.is_false(H.exists(work .. "/journal.jsonl"))
    -- told another --window: refused, naming it
    code, out, err = lbatch(emu, ("adopt %s --run %s --dir %s --max-lines 2 --window 48h"):format(input, run, work))
    assert.are.equal(1, code, out .. err)
    assert.matches("window 24h, not 48h", err)
    -- told nothing: the run's shards are read from the account
    code, out, err = lbatch(emu, ("adopt %s --run %s --dir %s"):format(input, run, work))
    assert.are.equal(0, code, out .. err)
    assert.matches("2 shard%(s%): 2 file%(s%) and 2 batch%(es%) found; its shards hold 2 lines", out)
    local journal = H.read(work .. "/journal.jsonl")
    assert.matches('"run":"' .. run .. '"', journal)
    -- the next run resumes the paid batches: nothing sent again, all four back
    modes({ hold = false })
    code, out, err = lbatch(emu, ("run %s --dir %s --poll 0.05"):format(input, work))
    assert.are.equal(0, code, out .. err)
    assert.matches("lbatch: run " .. run .. " in ", err)
    assert.matches("4 requests, 4 ok, 0 failed, 0 missing, %d+ tokens, 2 shard%(s%); run " .. run, out)
    -- (exact: the kill came once both were made, when only status calls go out)
    assert.are.same({ 2, 2 }, { routes(emu)["POST /files"], routes(emu)["POST /batches"] })
  end)
end)
