-- make soak: the kill -9 soak of the pipeline and the flow (spec/soak/kills.lua),
-- hundreds of random kills against an emulator that makes uploads and
-- creates late, each restart at once or after a pause. Bounded by its
-- figures (environment): SOAK_PIPELINES jobs (40) of SOAK_LINES requests
-- (60: 6 shards), SOAK_FLOWS flow jobs (15) of SOAK_ITEMS items (100),
-- each job killed SOAK_KILLS times (6) before a last run to its end;
-- SOAK_SLOW, the seconds an upload or a create takes to be made (0.5);
-- SOAK_WINDOW, the runs' recover_window (default 3 x SOAK_SLOW + 1; 0 shows
-- what the soak catches without it); SOAK_SEED. Prints the figures; exits 1 on the first rule broken.
local H = require "helper"
local kills = require "soak.kills"

local function num(name, default) return tonumber(os.getenv(name) or "") or default end
local seed = num("SOAK_SEED", os.time())
math.randomseed(seed)
local o = { pipelines = num("SOAK_PIPELINES", 40), flows = num("SOAK_FLOWS", 15), kills = num("SOAK_KILLS", 6),
            lines = num("SOAK_LINES", 60), items = num("SOAK_ITEMS", 100), slow = num("SOAK_SLOW", 0.5), pause = 0.5,
            window = num("SOAK_WINDOW", nil) }
print(("soak: seed %d, %d pipeline and %d flow jobs, %d kills each, slow_commit %g s"):format(seed, o.pipelines,
  o.flows, o.kills, o.slow))
local t0 = H.now()
local ok, fig, emu = pcall(kills.soak, o)
if emu then emu.stop() end
if not ok then
  print("soak: FAILED (seed " .. seed .. "): " .. tostring(fig))
  os.exit(1)
end
print(("soak: %d kills (%d restarted at once, %d after a pause), %d jobs, %d uploads sent for %d files, "
  .. "%d creates sent for %d batches, %d answers, %d pipeline requests answered once; %.0f s")
  :format(fig.kills, fig.at_once, fig.paused, fig.jobs, fig.uploads, fig.files, fig.creates, fig.batches, fig.answers,
    fig.requests, H.now() - t0))
print("soak: passed: every request answered once, no upload and no batch made twice")
