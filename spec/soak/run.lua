-- make soak: the kill -9 soak of the pipeline and the flow (spec/soak/kills.lua):
-- random kills against an emulator that makes uploads and creates late,
-- each restart at once or after a pause, jobs after jobs (two pipeline
-- jobs of SOAK_LINES requests, 60: 6 shards, then a flow job of SOAK_ITEMS
-- items, 100), each killed up to SOAK_KILLS times (12) before a last run to
-- its end, until SOAK_TARGET kills (400) were made; bounded by SOAK_MINUTES
-- (20). SOAK_SLOW: the seconds an upload or a create takes to be made
-- (0.5); SOAK_WINDOW: the runs' recover_window (default 3 x SOAK_SLOW + 1;
-- 0 shows what the soak catches without it); SOAK_SEED. Prints the
-- figures; exits 1 on the first rule broken.
local H = require "helper"
local kills = require "soak.kills"

local function num(name, default) return tonumber(os.getenv(name) or "") or default end
local seed = num("SOAK_SEED", os.time())
math.randomseed(seed)
local o = { target = num("SOAK_TARGET", 400), seconds = 60 * num("SOAK_MINUTES", 20), kills = num("SOAK_KILLS", 12),
            lines = num("SOAK_LINES", 60), items = num("SOAK_ITEMS", 100), slow = num("SOAK_SLOW", 0.5), pause = 0.5,
            window = num("SOAK_WINDOW", nil) }
print(("soak: seed %d, until %d kills or %d min, up to %d kills a job, slow_commit %g s"):format(seed, o.target,
  o.seconds / 60, o.kills, o.slow))
local t0 = H.now()
local ok, fig, emu = pcall(kills.soak, o)
if emu then emu.stop() end
if not ok then
  print("soak: FAILED (seed " .. seed .. "): " .. tostring(fig))
  os.exit(1)
end
print(("soak: %d kills (%d restarted at once, %d after a pause), %d jobs (%d flows), %d uploads sent for %d files, "
  .. "%d creates sent for %d batches, %d answers, %d pipeline requests answered once; %.0f s")
  :format(fig.kills, fig.at_once, fig.paused, fig.jobs, fig.flows, fig.uploads, fig.files, fig.creates, fig.batches, fig.answers,
    fig.requests, H.now() - t0))
print("soak: passed: every request answered once, no upload and no batch made twice")
