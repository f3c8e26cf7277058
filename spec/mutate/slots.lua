-- spec/mutate/slots.lua: the mutation run's runner (spec/mutate/run loads it
-- with dofile once it has chosen the mutants).
--
-- MUTATE_JOBS mutants (default 2, at most 2: the machine has 2 cores) run at
-- the same time, each slot in a temp copy of the tree of its own, its busted
-- with ports of its own (LBATCH_PORT_BASE: 20000 and 26000; spec/helper.lua
-- picks in B..B+2999, and the slot's whole-suite jobs in the blocks of 3,000
-- after: all below the kernel's ephemeral range, 32768, and above make
-- test's, 2000-19999) and a TMPDIR of its own. Each slot is a coroutine; a
-- step (a build, one spec file, the fuzzer, the whole suite) runs in the
-- background and the coroutine yields until the step's exit code is
-- written. A mutant runs its module's specs one file at a time, quickest
-- first, and stops at the first that kills it; a survivor of them runs
-- against the whole Lua 5.4 suite, which decides: spec/run-all's "Lua 5.4"
-- stage, its job pool (MUTATE_WHOLE_JOBS at once, default the slot's share
-- of the 4 blocks: 2, or 4 with MUTATE_JOBS=1), stopping at the first failure.

local BASES, BLOCKS = { 20000, 26000 }, 4   -- 4 blocks of 3,000 ports: 20000-31999

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end
-- Ctrl-C reaches the whole process group. While os.execute runs a command,
-- system() ignores SIGINT in this process: the command dies of it, and that
-- is the only sign. Every command goes through ok(), which notes it, and the
-- loop stops the run at its next turn (else a Ctrl-C that lands there is lost).
local interrupted = false
local function ok(cmd)
  local r, how = os.execute(cmd)
  if how == "signal" then interrupted = true end
  return r == true
end
local function sh(cmd)
  local p = assert(io.popen(cmd))
  local out = p:read("a")
  p:close()
  return out
end
local function readf(path)
  local f = io.open(path, "rb")
  if not f then return "" end
  local s = f:read("a")
  f:close()
  return s
end
local function writef(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end
-- seconds, to a tenth (the machine's uptime: monotonic)
local function clock() return tonumber(readf("/proc/uptime"):match("^[%d.]+")) end

-- run cmd in the background; yield until its exit code is written
local function bg(slot, cmd)
  local rc = slot.dir .. "/rc"
  os.remove(rc)
  assert(ok(("(%s; echo $? >%s.tmp && mv %s.tmp %s) </dev/null >/dev/null 2>&1 &")
    :format(cmd, q(rc), q(rc), q(rc))))
  while true do
    local s = readf(rc)
    if s:match("\n") then return tonumber(s:match("%d+")) end
    coroutine.yield()
  end
end

-- the servers a step left behind (a mutant that hung: its emulators were
-- never stopped): the processes started from the slot's copy, by their ids
local function sweep(slot)
  for pid in sh("pgrep -f " .. q(slot.copy .. "/") .. " 2>/dev/null"):gmatch("%d+") do
    ok("kill -TERM " .. pid .. " 2>/dev/null")
  end
end

-- on Ctrl-C: every process the run started, by its id: those whose command
-- line or working directory is in the run's temp dir (busted runs under
-- `timeout`, in a process group of its own, from the slot's copy)
local function stop_all(tmp)
  local pids = sh("pgrep -f " .. q(tmp .. "/") .. " 2>/dev/null; find /proc -mindepth 2 -maxdepth 2 -name cwd " ..
    "-lname " .. q(tmp .. "/*") .. " 2>/dev/null")
  local list = {}
  for pid in pids:gmatch("%d+") do list[#list + 1] = pid end
  if #list > 0 then os.execute("kill -TERM " .. table.concat(list, " ") .. " 2>/dev/null") end
end

local function new_slot(o, i, from)
  local dir = ("%s/s%d"):format(o.tmp, i)
  local slot = { i = i, dir = dir, copy = dir .. "/tree", tmpdir = dir .. "/tmp", base = BASES[i] }
  if from then
    assert(ok(("mkdir -p %s && cp -a %s %s"):format(q(slot.tmpdir), q(from.copy), q(slot.copy))))
  else
    -- the tree without its history, the sanitizer and fuzz builds or node modules
    assert(ok(("mkdir -p %s %s && cd %s && tar -cf - --exclude=./.git --exclude=./build/asan " ..
      "--exclude=./build/fuzz --exclude=./emulator/conformance/node_modules . | (cd %s && tar -xf -)")
      :format(q(slot.copy), q(slot.tmpdir), q(o.root), q(slot.copy))))
    assert(ok(("cd %s && make -s build/5.4/lbatch/core.so >/dev/null 2>&1"):format(q(slot.copy))),
      "mutate: the build failed (make build)")
  end
  assert(ok(("cp %s/build/5.4/lbatch/core.so %s/core.so"):format(q(slot.copy), q(dir))))
  return slot
end

local function busted(o, slot, args, jit, limit)
  local v, lua = jit and "jit" or "5.4", jit and "luajit" or "lua5.4"
  return ("cd %s && env LUA_PATH='./?.lua;./?/init.lua;./spec/?.lua;;' LUA_CPATH='./build/%s/?.so;;' " ..
    "LBATCH_ROOT=%s LBATCH_LUA=%s LBATCH_PORT_BASE=%d TMPDIR=%s nice -n 10 timeout %d %s /usr/bin/busted " ..
    "--no-keep-going --exclude-tags=timing,conformance,docs %s >%s/log 2>&1")
    :format(q(slot.copy), v, q(slot.copy), lua, slot.base, q(slot.tmpdir), limit or o.timeout, lua, args, q(slot.dir))
end

-- the whole suite's step: spec/run-all's "Lua 5.4" stage over `specs`, in
-- its job pool (each job a spec file, with ports, a TMPDIR and a session of
-- its own), `jobs` at once in the slot's port blocks, stopped at the first failure
local function whole_suite(o, slot, specs, jobs)
  return ("cd %s && env LBATCH_STAGES='^Lua 5\\.4$' LBATCH_SPECS=%s LBATCH_JOBS=%d LBATCH_PORTS_FROM=%d " ..
    "LBATCH_EXCLUDE_TAGS=conformance,docs LBATCH_FAIL_FAST=1 LBATCH_NO_CGROUP=1 TMPDIR=%s " ..
    "nice -n 10 timeout %d bash spec/run-all >%s/log 2>&1")
    :format(q(slot.copy), q(specs), jobs, slot.base, q(slot.tmpdir), o.whole_timeout, q(slot.dir))
end

-- run a step; true, seconds when it passes, else false and what failed
local function passes(slot, cmd, limit)
  local t = clock()
  local code = bg(slot, cmd)
  sweep(slot)
  if code == 0 then return true, clock() - t end
  local log = readf(slot.dir .. "/log")
  local where, name = log:match("\n(Failure %-> [^\n]*)\n([^\n]*)")
  if not where then where, name = log:match("\n(Error %-> [^\n]*)\n([^\n]*)") end
  -- run-all's: its list of failures, the first failing job's first
  local first = log:match("\nfailed:\n  %[([^\n]*)")
  if first then
    local file, test = first:match("^[^%]]*%] (%S+_spec%.lua @ %d+): (.*)$")
    if not file then file, test = first:match("^[^%]]*: (%S+_spec%.lua)%] (.*)$") end
    if file then where, name = "Failure -> " .. file, test end
  end
  local why = code == 124 and ("timed out after %d s"):format(limit) or where and (where .. ": " .. name)
    or log:match("==%d+==%s*(ERROR[^\n]*)") or "the run failed: " .. (log:match("[^\n]+") or "")
  if #why > 160 then why = why:sub(1, 157) .. "..." end
  return false, why
end

-- the whole suite (as `busted --exclude-pattern=hostile_spec spec` finds
-- it) but the spec files this mutant has passed already
local all_specs
local function whole(o, passed)
  if not all_specs then
    all_specs = {}
    for f in sh("cd " .. q(o.root) .. " && find spec -type f -name '*_spec*.lua' | LC_ALL=C sort"):gmatch("[^\n]+") do
      if not f:match("[^/]*$"):find("hostile_spec") then all_specs[#all_specs + 1] = f end
    end
  end
  local left = {}
  for _, f in ipairs(all_specs) do if not passed[f] then left[#left + 1] = f end end
  return table.concat(left, " ")
end

local function restore(slot, m)
  writef(slot.copy .. "/" .. m.file, m.orig)     -- as it was when the run began, whatever the tree holds now
  if m.file:match("%.c$") then
    ok(("cp %s/core.so %s/build/5.4/lbatch/core.so"):format(q(slot.dir), q(slot.copy)))
  end
end

-- one mutant in a slot: its verdict, its class (killed, survived, equiv,
-- stillborn) and, when killed, the first failure
local function judge_mutant(o, slot, m)
  writef(slot.copy .. "/" .. m.file, m.src)
  if m.file:match("%.c$") and bg(slot, ("cd %s && nice -n 10 make -s build/5.4/lbatch/core.so >/dev/null 2>&1")
      :format(q(slot.copy))) ~= 0 then
    return "stillborn (does not build)", "stillborn"
  end
  local passed = {}
  for _, spec in ipairs(o.specs_of(m.file)) do
    local pass, x = passes(slot, busted(o, slot, spec), o.timeout)
    if not pass then return "killed by " .. spec, "killed", x end
    o.record_time(spec, x)
    passed[spec] = true
  end
  local jit = o.jit_specs[m.file]
  if jit then
    local pass, why = passes(slot, busted(o, slot, table.concat(jit, " "), true), o.timeout)
    if not pass then return "killed on LuaJIT by " .. table.concat(jit, " "), "killed", why end
  end
  if o.fuzzed[m.file] then
    local pass, why = passes(slot, ("cd %s && env TMPDIR=%s nice -n 10 spec/fuzz/run %d >%s/log 2>&1")
      :format(q(slot.copy), q(slot.tmpdir), o.fuzz_seconds, q(slot.dir)), o.timeout)
    if not pass then return "killed by the fuzzer (spec/fuzz/run " .. o.fuzz_seconds .. ")", "killed", why end
  end
  local eq = o.is_equivalent(m)
  if eq and not o.full then return "survived its specs: equivalent (EQUIVALENT.md)", "equiv" end
  if not o.whole_too then return "SURVIVED its specs (the whole suite not run: MUTATE_WHOLE=0)", "survived" end
  local pass, why = passes(slot, whole_suite(o, slot, whole(o, passed), o.whole_jobs), o.whole_timeout)
  if not pass then
    return "killed by the whole suite" .. (why:match("%-> (%S+%.lua)") and " (" .. why:match("%-> (%S+%.lua)") .. ")" or ""),
      "killed", why
  end
  if eq then return "survived the whole suite: equivalent (EQUIVALENT.md)", "equiv" end
  return "SURVIVED the whole suite", "survived"
end

-- a kill counts when the spec file that made it passes without the mutant
-- (the tree as it was, in the same slot): one that fails there too (flaky
-- under load, or broken) decides nothing, and the verdict says so
local function judge(o, slot, m)
  local verdict, class, why = judge_mutant(o, slot, m)
  local spec = class == "killed" and why and why:match("%-> (%S+_spec%.lua)")
  if not spec then return verdict, class, why end
  restore(slot, m)
  if passes(slot, busted(o, slot, spec), o.timeout) then return verdict, class, why end
  return verdict .. ", but " .. spec .. " fails without the mutant too: UNSURE (rerun it: MUTATE_ONLY)", "unsure", why
end

local function report(o, n, m, t, verdict, why)
  if o.is_equivalent(m) and verdict:match("^killed") then verdict = verdict .. " (listed as equivalent: it is not)" end
  io.write(o.describe(n, m), "\n    ", verdict, (" [%.1f s]\n"):format(clock() - t))
  if verdict:match("^killed") and why then io.write("      (", why, ")\n") end
  io.flush()
end

return function(o)
  local queue = {}
  for n = 1, #o.mutants do if not o.only or o.only[n] then queue[#queue + 1] = n end end
  local jobs = math.max(1, math.min(tonumber(os.getenv("MUTATE_JOBS") or "2") or 2, #BASES, #queue))
  o.whole_jobs = math.max(1, math.min(tonumber(os.getenv("MUTATE_WHOLE_JOBS") or "") or BLOCKS // jobs, BLOCKS // jobs))
  local t0 = clock()
  local slots = { new_slot(o, 1) }
  for i = 2, jobs do slots[i] = new_slot(o, i, slots[1]) end
  print(("mutate: %d mutants (of %d sites) in %d files, seed %d%s; %d at a time")
    :format(#queue, o.total_sites, #o.files, o.seed, o.since_note, jobs))
  io.flush()
  local count = { killed = 0, survived = 0, equiv = 0, stillborn = 0, unsure = 0 }
  local survivors, next_q = {}, 1
  while true do
    local busy = false
    for _, slot in ipairs(slots) do
      if not slot.co and next_q <= #queue then
        local n = queue[next_q]
        next_q = next_q + 1
        slot.n, slot.t = n, clock()
        slot.co = coroutine.create(function()
          local verdict, class, why = judge(o, slot, o.mutants[n])
          restore(slot, o.mutants[n])
          return verdict, class, why
        end)
      end
      if slot.co then
        local fine, verdict, class, why = coroutine.resume(slot.co)
        -- (a SIGINT while this process ran Lua code: the interpreter's "interrupted!")
        if not fine and tostring(verdict):find("interrupted!", 1, true) then interrupted = true end
        if interrupted then stop_all(o.tmp) o.cleanup() os.exit(130) end
        if not fine then o.cleanup() error(verdict) end
        if coroutine.status(slot.co) == "dead" then
          local m = o.mutants[slot.n]
          report(o, slot.n, m, slot.t, verdict, why)
          count[class] = count[class] + 1
          if class == "survived" or class == "unsure" then
            survivors[#survivors + 1] = o.describe(slot.n, m) .. (class == "unsure" and "  [unsure]" or "")
          end
          slot.co = nil
        else
          busy = true
        end
      end
    end
    if not busy and next_q > #queue then break end
    ok("sleep 0.2")
    if interrupted then stop_all(o.tmp) o.cleanup() os.exit(130) end
  end
  o.cleanup()
  local wall = clock() - t0
  local scored = #queue - count.stillborn
  local real = scored - count.equiv
  print()
  if #survivors > 0 then
    print("survivors (neither killed nor in spec/mutate/EQUIVALENT.md) and unsure kills:")
    table.sort(survivors)
    for _, s in ipairs(survivors) do print("  " .. s) end
  end
  print(("mutate: %d mutants in %d files (seed %d%s): %d killed, %d survived (%d equivalent), %d stillborn%s")
    :format(scored, #o.files, o.seed, o.since_note, count.killed, scored - count.killed - count.unsure, count.equiv,
      count.stillborn, count.unsure > 0 and (", %d unsure (killed by a spec that fails without them too)")
        :format(count.unsure) or ""))
  print(("score: %d/%d killed (%.0f%%), %d/%d of the non-equivalent mutants (%.0f%%)")
    :format(count.killed, scored, scored > 0 and 100 * count.killed / scored or 0, count.killed, real,
      real > 0 and 100 * count.killed / real or 0))
  print(("wall time: %d min %02d s (%d at a time)"):format(wall // 60, math.floor(wall % 60), jobs))
  os.exit(#survivors == 0 and 0 or 1)
end
