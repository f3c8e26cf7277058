--- Flows: one item's steps written as plain sequential Lua, run for many
-- items at batch prices. Each `ask` inside `step` returns the answer of a
-- request that went out in a batch:
--
--   local report = assert(flow.run{ client = client, dir = "work", items = "questions.csv",
--     step = function(item, ask)
--       local a = assert(ask{ model = "qwen-plus", prompt = item.question })
--       local j = assert(ask{ model = "qwen-max", prompt = "Score 1-10:\n" .. a.content })
--       return { answer = a.content, score = tonumber(j.content) }
--     end })
--   for r in report.results:each() do print(r.key, r.ok and r.value.score or r.error) end
--
-- The run goes in rounds. A round runs every unfinished item's `step`
-- from its start in a coroutine; each `ask` is answered from the journal
-- until one has no answer yet: that request is written to the round's
-- request file and the coroutine is dropped (nothing of an item stays in
-- memory between rounds). The round's requests go out through
-- `lbatch.pipeline` (sharded by model, endpoint and thinking mode and the
-- limits; quotas, retries, the poll budget, its own journal), and their
-- answers are written to disk beside the journal. An item's `step` must
-- therefore be deterministic given its answers: the same item and the
-- same answers make the same asks, in the same order. An ask whose
-- request differs from the one journaled at its place (the code changed)
-- stops the run with an error naming the item, unless `on_change =
-- "ask_again"` (then that request is asked again).
--
-- With `finish_realtime = N`, a round of at most N asks (the stragglers
-- of the last steps) goes through the service's real-time endpoint
-- (`client:request`) at full price instead of another batch; each answer
-- is the same record, journaled as it comes.
--
-- With `flush = {lines = N, seconds = S}`, items go at their own pace:
-- each shard of a round is a pipeline of its own, and a pass starts once
-- the shards back hold N answers or S seconds after the oldest came back
-- (see "flush" below).
--
-- On disk, under `dir`:
--   flow.json              the run's state (round, phase, the round's shards), replaced atomically
--   round-R/asks*.jsonl    the round's requests (one file a shard), custom_id `key#n`
--   round-R/state.jsonl    every unfinished item: its place, key, item, answers so far, asks pending
--   round-R/done.jsonl     the items that finished in that round: value or error
--   round-R/batches/       the round's pipeline (its journal); with flush, batches-G a shard's
--   round-R/answers-G.jsonl  the answers of shard G, in its lines' order
--   round-R/realtime.jsonl   a real-time round's answers as they came (finish_realtime)
--   results.jsonl          every item's result, in the items' order
-- Each file of a round is written whole and synced to disk before
-- flow.json moves on: killed at any moment, `run` on the same `dir`
-- goes on from the last phase reached and asks nothing twice.
--
-- The formats (M.FORMAT, M.VERSION: "lbatch-flow", 2; version 1, the
-- one-letter names, is still read): flow.json has `format` and `version`
-- and, with flush, `shards = {{round, shard, status = "out" | "answered",
-- answered_at}}`; a line of state.jsonl is `{index, key, item, answers =
-- {[ask] = {hash, record}}, pending = {ask, ...}, pending_hashes = {[ask] =
-- hash}, pending_shards = {[ask] = "round.shard"}}`, of done.jsonl `{index,
-- key, ok, value | error}`; realtime.jsonl starts with `{format =
-- "lbatch-realtime", version = 1}`.
-- @module lbatch.flow
local cjson = require "cjson"
local core = require "lbatch.core"
local json = require "lbatch.json"
local jsonl = require "lbatch.jsonl"
local csv = require "lbatch.csv"
local errors = require "lbatch.impl.transport.errors"
local results = require "lbatch.results"
local pipeline = require "lbatch.pipeline"
local estimate = require "lbatch.impl.formats.estimate"
local cost = require "lbatch.impl.formats.cost"
local journal = require "lbatch.impl.orchestration.journal"
local quota = require "lbatch.impl.orchestration.quota"
local lock = require "lbatch.impl.orchestration.lock"

local encode, decode, normalize = json.encode, json.decode, json.normalize
local throw = errors.throw

local M = {}

local function fail(code, message, fields)
  local e = fields or {}
  e.kind, e.code, e.message = e.kind or "invalid", code, "flow: " .. message
  return errors.new(e)
end

-- ------------------------------------------------------------ files

local function sync(path)
  local ok, why = core.fsync(path)
  if not ok then throw(errors.io("cannot sync", path, why)) end
end

local function create(path)
  local fh, msg = io.open(path, "wb")
  if not fh then throw(errors.io("cannot write", path, msg)) end
  fh:setvbuf("full", 1024 * 1024)
  return fh
end

local function close_synced(fh, path)
  local ok, msg = fh:close()
  if not ok then throw(errors.io("cannot write", path, msg)) end
  sync(path)
end

local function write_line(fh, path, v)
  local ok, msg = fh:write(encode(v), "\n")
  if not ok then throw(errors.io("cannot write", path, msg)) end
end

-- the lines of a JSON-lines file, decoded, one at a time
local function each_line(path)
  local fh, msg = io.open(path, "rb")
  if not fh then throw(errors.io("cannot read", path, msg)) end
  local it = fh:lines()
  return function()
    while true do
      local line = it()
      if not line then fh:close() return nil end
      if line:find("%S") then return normalize(decode(line)) end
    end
  end
end

-- flow.json, replaced whole: written aside, synced, renamed, the directory synced
local function save_state(dir, st)
  local path = dir .. "/flow.json"
  local ok, err = journal.replace(path, function(fh) write_line(fh, path, st) return true end)
  if not ok then throw(err) end
end

--- The format of a flow's dir (flow.json's `format`).
M.FORMAT = "lbatch-flow"
--- The version of that format (flow.json's `version`).
M.VERSION = 2

local function fresh()
  return { format = M.FORMAT, version = M.VERSION, round = 0, phase = "answered", items = 0, done = 0, failed = 0,
           tokens = 0, cost = 0, rounds = {} }
end

-- flow.json as this version writes it: version 1's shards {r, g, s, at}
-- renamed; a newer version than this one is refused
local function upgrade(dir, st)
  if st.version == 1 and st.format == nil then
    for i, sh in ipairs(st.shards or {}) do
      st.shards[i] = { round = sh.r, shard = sh.g, status = sh.s, answered_at = sh.at }
    end
    st.format, st.version = M.FORMAT, M.VERSION
  elseif st.format ~= M.FORMAT or st.version ~= M.VERSION then
    throw(fail("bad_state", ("%s/flow.json is %s version %s; this lbatch reads %s versions 1 and %d: run it "
      .. "with the lbatch that wrote it"):format(dir, tostring(st.format), tostring(st.version), M.FORMAT,
      M.VERSION)))
  end
  return st
end

-- a line of state.jsonl as this version writes it (version 1's named i, k, a, p, h, t)
local function entry_of(rec)
  if rec.i == nil then return rec end
  local answers = {}
  for place, a in pairs(rec.a or {}) do answers[place] = { hash = a.h, record = a.r } end
  return { index = rec.i, key = rec.k, item = rec.item, answers = answers, pending = rec.p,
           pending_hashes = rec.h, pending_shards = rec.t }
end

local function load_state(dir)
  local fh = io.open(dir .. "/flow.json", "rb")
  if not fh then return fresh() end
  local text = fh:read("*a")
  fh:close()
  local ok, st = pcall(decode, text)
  if not ok or type(st) ~= "table" then throw(fail("bad_state", dir .. "/flow.json is not a flow's state")) end
  return upgrade(dir, normalize(st))
end

-- ------------------------------------------------------------ items

local function first_key(item)
  if type(item) ~= "table" then return item end
  return item.custom_id or item.id or item[1]
end

-- items: a .csv (a header row names the fields; the first column is the
-- default key), a .jsonl (an object a line), a list, or an iterator
local function each_item(src)
  if type(src) == "string" and src:find("%.csv$") then
    local rows, err = csv.rows(src)
    if not rows then throw(err) end
    local header
    return function()
      while true do
        local row, rerr = rows()
        if row == false then throw(rerr) end
        if row == nil then return nil end
        if not header then header = row
        elseif #row > 1 or (row[1] or "") ~= "" then
          local item = {}
          for i, name in ipairs(header) do item[name] = row[i] end
          return item, row[1]
        end
      end
    end
  elseif type(src) == "string" then
    return each_line(src)
  elseif type(src) == "table" then
    local i = 0
    return function() i = i + 1 return src[i] end
  elseif type(src) == "function" then
    return src
  end
  errors.arg("flow.run", "items must be a .csv or .jsonl path, a list or an iterator", 3)
end

-- ------------------------------------------------------------ asks

-- a value as JSON with its keys sorted: the same request, the same text
local function canonical(v, out)
  local t = type(v)
  if t ~= "table" then
    out[#out + 1] = cjson.encode(v)
    return out
  end
  local keys, n = {}, 0
  for k in pairs(v) do n = n + 1 keys[n] = k end
  if n == #v then
    out[#out + 1] = "["
    for i = 1, n do
      if i > 1 then out[#out + 1] = "," end
      canonical(v[i], out)
    end
    out[#out + 1] = "]"
    return out
  end
  for i = 1, n do keys[i] = tostring(keys[i]) end
  table.sort(keys)
  out[#out + 1] = "{"
  for i, k in ipairs(keys) do
    if i > 1 then out[#out + 1] = "," end
    local val = v[k]
    if val == nil then val = v[tonumber(k)] end
    out[#out + 1] = cjson.encode(k) .. ":"
    canonical(val, out)
  end
  out[#out + 1] = "}"
  return out
end

local hex = core.hex

--- The hash an ask is journaled under: its request's fields, keys sorted.
-- @tparam table req an ask's request
-- @treturn string 16 hex digits
function M.hash(req)
  return hex(core.hmac_sha256("lbatch.flow", table.concat(canonical(req, {}))):sub(1, 8))
end

-- an answer record as ask returns it: the record, or nil and an error
local function outcome(rec)
  if rec.ok then return rec end
  return nil, errors.new({ kind = rec.missing and "cancelled" or "http", status = rec.status_code,
    code = rec.error_code or (rec.missing and "missing") or "failed", custom_id = rec.custom_id,
    message = rec.error_message or (rec.missing and "the request has no result (its batch did not run it)")
      or "the request failed", record = rec })
end

local BLOCKED = setmetatable({}, { __tostring = function() return "flow: blocked" end })
local contexts = setmetatable({}, { __mode = "k" })   -- coroutine -> its asks' context

-- A context: the item's run, the place of its next ask (`prefix` .. n).
local function context()
  local ctx = contexts[coroutine.running() or false]
  if not ctx then error("flow: ask called outside an item's step (or a flow.all branch)", 3) end
  return ctx
end

-- one ask: its answer (true, rec), or false when it was written out
local function take(ctx, req)
  if type(req) ~= "table" then error("flow: an ask takes a table (prompt, messages, body, ...)", 4) end
  local run, entry = ctx.run, ctx.entry
  ctx.n = ctx.n + 1
  local place = ctx.prefix .. ctx.n
  local h = M.hash(req)
  local got = entry.answers[place]
  if got then
    if got.hash == h then return true, got.record end
    if run.on_change ~= "ask_again" then
      run.failure = run.failure or fail("flow_changed", ("item %s: ask %s is not the request journaled at "
        .. "its place (the step changed since it was asked); on_change = \"ask_again\" asks it again")
        :format(entry.key, place), { custom_id = entry.key .. "#" .. place, param = "on_change" })
      throw(run.failure)
    end
    entry.answers[place] = nil
  end
  local ok, err = run:write(entry.key .. "#" .. place, req)
  if not ok then                    -- refused by the rules: answered at once, the same each time
    return true, { custom_id = entry.key .. "#" .. place, ok = false, error_code = err.code,
                   error_message = err.message }
  end
  local out = ctx.out
  out.pending[#out.pending + 1], out.hashes[place] = place, h
  if run.flush then out.shards[place] = run.round .. "." .. run.writer:last_shard() end
  return false
end

--- Ask for one request; inside `step` (the `ask` it is given).
-- @tparam table req the writer's helpers' fields (model, prompt, system,
-- messages, images, embedding `input`, any body field) or a raw `body`
-- and `url`
-- @return the result record (content, usage, ok, ...), or nil and an error
local function ask(req)
  local ctx = context()
  local have, rec = take(ctx, req)
  if not have then coroutine.yield(BLOCKED) end
  return outcome(rec)
end

-- several asks in one round: records (false for a failed one) and errors
local function ask_all(reqs)
  local ctx = context()
  local recs, errs, blocked = {}, {}, false
  for i, req in ipairs(reqs) do
    local have, rec = take(ctx, req)
    if have then recs[i], errs[i] = outcome(rec) else blocked = true end
    if recs[i] == nil then recs[i] = false end
  end
  if blocked then coroutine.yield(BLOCKED) end
  return recs, errs
end

local Ask = setmetatable({ all = ask_all }, { __call = function(_, req) return ask(req) end })

-- run fn in a coroutine under ctx: "done", value | "blocked" | "failed", err
local function drive(ctx, fn, ...)
  local co = coroutine.create(fn)
  contexts[co] = ctx
  local ok, v = coroutine.resume(co, ...)
  contexts[co] = nil
  if not ok then return "failed", v end
  if coroutine.status(co) == "suspended" then
    if v == BLOCKED then return "blocked" end
    return "failed", "flow: a step yielded outside ask (its own coroutines must not yield through it)"
  end
  return "done", v
end

--- Run functions as branches of one item whose asks go out in the same
-- round (three judges at once); inside `step`.
-- @tparam {function,...} fns each called with no arguments; its asks
-- (through the item's `ask`) are numbered in its own branch
-- @return a list of the branches' values (the first value each returned)
function M.all(fns)
  local ctx = context()
  ctx.n = ctx.n + 1
  local base = ctx.prefix .. ctx.n .. "."
  local values, blocked, failure = {}, false, nil
  for i, fn in ipairs(fns) do
    local sub = { run = ctx.run, entry = ctx.entry, prefix = base .. i .. ".", n = 0, out = ctx.out }
    local how, v = drive(sub, fn)
    if how == "blocked" then blocked = true
    elseif how == "failed" then failure = failure or { v }
    else values[i] = v end
  end
  -- a branch that is waiting goes first: an error is raised once all are answered
  if blocked then coroutine.yield(BLOCKED) end
  if failure then error(failure[1], 0) end
  return values
end

-- ------------------------------------------------------------ a round

local Run = {}
Run.__index = Run

-- an ask's request line, through the round's writer (its rules, its shards)
function Run:write(id, req)
  local w = self.writer
  local ok, err
  if req.body then ok, err = w:add(id, req.body, req.url)
  elseif req.input ~= nil then
    local o = {}
    for k, v in pairs(req) do if k ~= "url" then o[k] = v end end
    ok, err = w:embedding(id, o)
  else ok, err = w:chat(id, req) end
  if not ok and (err.kind == "io" or err.code == "duplicate_custom_id") then
    if err.kind ~= "io" then
      err = fail("duplicate_key", ("two items have the key %s: keys must be unique"):format(id:match("^(.*)#")),
        { param = "key" })
    end
    self.failure = self.failure or err          -- the run's, not the item's: its step cannot catch it
    throw(err)
  end
  return ok, err
end

-- an item through its step: "done", value | "blocked" | "failed", message;
-- and the asks it wrote out: {pending = places in order, hashes = place ->
-- hash, shards = place -> "round.shard" (flush)}
function Run:step(entry)
  local ctx = { run = self, entry = entry, prefix = "", n = 0, out = { pending = {}, hashes = {}, shards = {} } }
  local how, v = drive(ctx, self.opts.step, entry.item, Ask)
  if self.failure then throw(self.failure) end
  if how == "failed" then
    v = errors.thrown(v) or v
    return how, tostring(errors.is(v) and v.message or v), ctx.out
  end
  return how, v, ctx.out
end

-- the answers of the last round, one reader a shard, each in its lines'
-- order (the items' order): an item's answers are at the heads
local function answer_heads(dir, round, shards)
  local heads = {}
  for g = 1, shards do
    local it = each_line(("%s/round-%d/answers-%d.jsonl"):format(dir, round, g))
    heads[g] = { it = it, rec = it() }
  end
  return function(id)
    for _, h in ipairs(heads) do
      if h.rec and h.rec.custom_id == id then
        local rec = h.rec
        h.rec = h.it()
        return rec
      end
    end
    throw(fail("answer_lost", ("the answer to %s is not in round %d's answers"):format(id, round)))
  end
end

-- The answers of a flush pass's snapshot (the shards back, "round.shard"
-- -> true), one reader a shard: an ask tagged with a shard of it has its
-- answer at that shard's head; one tagged otherwise waits (nil).
local function shard_heads(dir, snapshot)
  local heads = {}
  for tag in pairs(snapshot) do
    local r, g = tag:match("^(%d+)%.(%d+)$")
    local it = each_line(("%s/round-%s/answers-%s.jsonl"):format(dir, r, g))
    heads[tag] = { it = it, rec = it() }
  end
  return function(id, tag)
    local h = heads[tag]
    if not h then return nil end
    local rec = h.rec
    if not rec or rec.custom_id ~= id then
      throw(fail("answer_lost", ("the answer to %s is not in shard %s's answers"):format(id, tag)))
    end
    h.rec = h.it()
    return rec
  end
end

-- What the run knows of the prices: tokens and their cost at batch prices.
function Run:count(rec)
  local u = rec.usage
  if type(u) ~= "table" then return end
  local p, c = tonumber(u.prompt_tokens or u.input_tokens) or 0, tonumber(u.completion_tokens or u.output_tokens) or 0
  local st = self.state
  st.tokens = st.tokens + p + c
  local price = self.prices and self.prices[rec.model or ""]
  if price then st.cost = st.cost + cost.of(p, c, price, rec.realtime and 1 or self.opts.discount) end
end

-- round 1's entries: the items as later rounds see them, each with its key
function Run:first_entries()
  local st, opts = self.state, self.opts
  local it, i, key = each_item(opts.items), 0, opts.key
  st.items = 0
  return function()
    local item, k = it()
    if item == nil then return nil end
    i = i + 1
    st.items = i
    if type(item) == "table" then item = normalize(decode(encode(item))) end   -- as later rounds see it
    k = key and key(item) or first_key(item) or k
    if type(k) == "number" then k = k == math.floor(k) and ("%d"):format(k) or tostring(k) end
    if type(k) ~= "string" or k == "" then
      throw(fail("no_key", ("item %d has no key (custom_id, id or a first column): give key = function(item)")
        :format(i)))
    end
    return { index = i, key = k, item = item, answers = {} }
  end
end

-- the entries of round R's pass and what answers their pending asks
function Run:pass_entries(R, snapshot)
  if R == 1 then return self:first_entries() end
  local dir, st = self.dir, self.state
  local it = each_line(("%s/round-%d/state.jsonl"):format(dir, R - 1))
  local entries = function()
    local rec = it()
    return rec and entry_of(rec)
  end
  return entries, snapshot and shard_heads(dir, snapshot) or answer_heads(dir, R - 1, #st.rounds[R - 1].files)
end

-- an entry's pending asks answered (journaled in its answers); the ones
-- whose shard is still out (flush) are left waiting
function Run:answer(entry, answer)
  local waiting = {}
  for _, place in ipairs(entry.pending or {}) do
    local rec = answer(entry.key .. "#" .. place, entry.pending_shards and entry.pending_shards[place])
    if rec then
      rec.line = nil
      self:count(rec)
      entry.answers[place] = { hash = entry.pending_hashes[place], record = rec }
    else
      waiting[#waiting + 1] = place
    end
  end
  return waiting
end

-- an entry through its step, unless asks of it are still waiting:
-- "done", value | "failed", message | "blocked"; and its asks pending
function Run:advance(entry, answer)
  local waiting = self:answer(entry, answer)
  if #waiting > 0 then
    local asked = { pending = waiting, hashes = {}, shards = {} }
    for _, place in ipairs(waiting) do
      asked.hashes[place], asked.shards[place] = entry.pending_hashes[place], entry.pending_shards[place]
    end
    return "blocked", nil, asked
  end
  entry.pending, entry.pending_hashes, entry.pending_shards = nil, nil, nil
  return self:step(entry)
end

-- an entry's line: in state.jsonl while it waits (its asks pending, their
-- answers journaled under their hashes, with flush the shard each went
-- out in), else its result in done.jsonl
function Run:file(entry, f, how, v, asked)
  if how == "blocked" then
    entry.pending, entry.pending_hashes = asked.pending, asked.hashes
    if self.flush then entry.pending_shards = asked.shards end
    for _, place in ipairs(asked.pending) do
      local top = "ask " .. place:match("^%d+")
      f.pending[top] = (f.pending[top] or 0) + 1
    end
    write_line(f.sfh, f.spath, entry)
    return
  end
  local rec = { index = entry.index, key = entry.key, ok = how == "done" }
  if rec.ok then rec.value = v else rec.error = v end
  local okj, line = pcall(encode, rec)
  if not okj then
    rec = { index = entry.index, key = entry.key, ok = false,
            error = "flow: the step's value is not JSON: " .. tostring(line) }
    line = encode(rec)
  end
  if rec.ok then f.done = f.done + 1 else f.failed = f.failed + 1 end
  local wok, msg = f.dfh:write(line, "\n")
  if not wok then throw(errors.io("cannot write", f.dpath, msg)) end
end

-- round R's pass ended: its files synced, flow.json moved on (with flush:
-- the snapshot's shards consumed, this pass's shards out, in one save)
function Run:end_pass(R, rdir, snapshot, f)
  local st, opts = self.state, self.opts
  close_synced(f.sfh, f.spath)
  close_synced(f.dfh, f.dpath)
  local manifest, err = self.writer:close()
  if not manifest then throw(err) end
  for _, file in ipairs(manifest.files) do sync(file.path) end
  sync(rdir)
  st.done, st.failed, st.pending = f.done, f.failed, f.pending
  st.rounds[R] = { asks = manifest.lines, files = manifest.files }
  st.round = R
  if self.flush then
    local shards = {}
    for _, sh in ipairs(st.shards or {}) do
      if not (snapshot and snapshot[sh.round .. "." .. sh.shard]) then shards[#shards + 1] = sh end
    end
    for g = 1, #manifest.files do shards[#shards + 1] = { round = R, shard = g, status = "out" } end
    st.shards, st.phase = shards, #shards == 0 and "finished" or "flowing"
  else
    local rt = opts.finish_realtime
    st.phase = manifest.lines == 0 and "finished" or (rt and manifest.lines <= rt) and "realtime" or "send"
  end
  if not self.dry then save_state(self.dir, st) end
  self:progress()
end

-- Round R's pass: every unfinished item runs from the start, answered
-- from the journal (the last round's state and answers); what it asks now
-- is round R's requests.
function Run:pass(R, snapshot)
  local st, opts = self.state, self.opts
  self.round = R
  local rdir = ("%s/round-%d"):format(self.dir, R)
  local made, why = core.mkdir(rdir)
  if not made then throw(errors.io("cannot make", rdir, why)) end
  self.writer = jsonl.writer({ path = rdir .. "/asks.jsonl", model = opts.model,
                               limits = opts.limits or (opts.client and opts.client.config.limits),
                               max_lines = opts.max_lines, max_bytes = opts.max_bytes, endpoint = opts.endpoint })
  local f = { spath = rdir .. "/state.jsonl", dpath = rdir .. "/done.jsonl", pending = {}, done = st.done,
              failed = st.failed }
  f.sfh, f.dfh = create(f.spath), create(f.dpath)
  local entries, answer = self:pass_entries(R, snapshot)
  local n, pause = 0, self.pause
  for entry in entries do
    n = n + 1
    self:file(entry, f, self:advance(entry, answer))
    if pause and n % 256 == 0 then pause() end
  end
  self:end_pass(R, rdir, snapshot, f)
end

-- A pipeline's options for files of round R, its journal in pdir.
function Run:pipeline_options(R, pdir, files)
  local opts = self.opts
  local po = {}
  for k, v in pairs(opts.pipeline or {}) do po[k] = v end
  for _, k in ipairs(M.PIPELINE_OPTIONS) do if opts[k] ~= nil then po[k] = opts[k] end end
  po.client, po.dir, po.manifest = self.client, pdir, { files = files }
  if opts.max_cost then po.max_cost = self:budget(R) end
  if opts.on_progress then
    po.on_progress = function(p) self:progress(p) end
  end
  return po
end

-- A pipeline's answers for one of its groups, in its lines' order, synced.
function Run:answers(group, path)
  local reader = errors.try(results.open({ groups = { group }, pause = self.pause }))
  local fh = create(path)
  for rec, rerr in reader:each() do
    if not rec then throw(rerr) end
    local _ = rec.body          -- a light record: its body decoded, its line dropped, before it is journaled
    rec.line = nil
    write_line(fh, path, rec)
  end
  close_synced(fh, path)
end

-- A round's asks files are the ones its pass wrote (flow.json keeps each
-- one's size): a file cut or changed since cannot be sent nor answered
-- from, and is refused by name before anything of it goes out.
local function check_asks(R, files)
  for _, f in ipairs(files) do
    local bytes = require("lbatch.impl.formats.size").file(f.path)
    if bytes ~= f.bytes then
      throw(fail("asks_damaged", ("%s has %s bytes, its pass wrote %d: the file was cut or changed, and round %d "
        .. "cannot be sent or answered from it. Restore it from a backup; or run the flow again in a new dir "
        .. "(its asks are made again from the same items, and paid again)"):format(f.path,
          bytes and tostring(bytes) or "no", f.bytes, R), { path = f.path }))
    end
  end
end

-- Round R's requests through a pipeline, then its answers on disk.
function Run:send(R)
  local dir, st = self.dir, self.state
  local rdir = ("%s/round-%d"):format(dir, R)
  check_asks(R, st.rounds[R].files)
  local report, err = pipeline.run(self:pipeline_options(R, rdir .. "/batches", st.rounds[R].files))
  if not report then throw(err) end
  for g, group in ipairs(report.groups) do self:answers(group, ("%s/answers-%d.jsonl"):format(rdir, g)) end
  sync(rdir)
  st.rounds[R].batches = #report.shards
  st.phase = "answered"
  save_state(dir, st)
end

-- ------------------------------------------------------------ flush

-- With `flush`, each shard of each pass is a pipeline of its own (a task;
-- its journal round-R/batches-G), all of them counting one quota. Back,
-- its answers are written (round-R/answers-G.jsonl, synced) and it is
-- marked answered in flow.json. A pass runs when the answered shards hold
-- flush.lines answers, when the oldest came back flush.seconds ago, or
-- when no shard is out: it takes the answered shards as they are then
-- (the snapshot), replays every item whose asks are all answered, copies
-- the others (their answers so far journaled), and in one save marks the
-- snapshot consumed and its own shards out. Killed in a pass, the pass
-- runs again from the same state file; killed in a shard, its pipeline
-- resumes from its journal.

-- one shard of round R through its pipeline, its answers on disk
function Run:send_shard(sh)
  local st, R, g = self.state, sh.round, sh.shard
  local rdir = ("%s/round-%d"):format(self.dir, R)
  check_asks(R, { st.rounds[R].files[g] })
  local po = self:pipeline_options(R, ("%s/batches-%d"):format(rdir, g), { st.rounds[R].files[g] })
  po.quota = self.quota
  local report, err = pipeline.run(po)
  if not report then throw(err) end
  self:answers(report.groups[1], ("%s/answers-%d.jsonl"):format(rdir, g))
  sync(rdir)
  st.rounds[R].batches = (st.rounds[R].batches or 0) + #report.shards
  sh.status, sh.answered_at = "answered", core.now()
  if not self.passing then save_state(self.dir, st) end    -- a pass saves it with its own
end

-- the shards back and not yet consumed, if a pass is due: "round.shard" -> true
function Run:due()
  local flush, now, lines, oldest, out, snapshot = self.opts.flush, core.now(), 0, nil, false, nil
  for _, sh in ipairs(self.state.shards) do
    if sh.status == "out" then out = true
    else
      snapshot = snapshot or {}
      snapshot[sh.round .. "." .. sh.shard] = true
      lines = lines + self.state.rounds[sh.round].files[sh.shard].lines
      oldest = math.min(oldest or sh.answered_at, sh.answered_at)
    end
  end
  if snapshot and (not out or (flush.lines and lines >= flush.lines)
                   or (flush.seconds and now - oldest >= flush.seconds)) then
    return snapshot
  end
end

function Run:flow()
  local st, client = self.state, self.client
  if st.round == 0 then self:pass(1) end
  local tasks, running, failure = {}, 0, nil
  local limit = math.max(1, self.opts.max_in_flight or 8)
  local ok, err = pcall(function()
    while st.phase == "flowing" and not failure do
      for _, sh in ipairs(st.shards) do
        local tag = sh.round .. "." .. sh.shard
        if sh.status == "out" and not tasks[tag] and running < limit then
          running = running + 1
          tasks[tag] = client:spawn(function()
            local done, why = pcall(self.send_shard, self, sh)
            running = running - 1
            if not done then failure = failure or errors.thrown(why) or why end
          end)
        end
      end
      local snapshot = self:due()
      if snapshot then
        self.passing = true
        self:pass(st.round + 1, snapshot)
        self.passing = false
      elseif not failure then
        client:sleep(0.05)
      end
    end
  end)
  -- stopped (a failure): the shards out end as a pipeline's do, their batches
  -- waited for and their answers kept, so that no task outlives the run
  for _, task in pairs(tasks) do task:join() end
  if not ok then throw(errors.thrown(err) or err) end
  if failure then throw(failure) end
end

-- The max_cost check of round R's real-time requests, at full price.
function Run:realtime_bound(R, files)
  local left = self:budget(R)
  if not left then return end
  local paths = {}
  for i, f in ipairs(files) do paths[i] = f.path end
  local rep = errors.try(estimate.files(paths, { prices = self.opts.prices, discount = 1 }))
  local t = rep.totals
  -- answers that cannot be bounded (no max_tokens) are not counted as free
  local bound = t.input_cost and t.output_cost_max and t.input_cost + t.output_cost_max
  if not bound or bound > left then
    throw(fail("max_cost", ("round %d's real-time requests may cost %s at full price, past the %.4g left of "
      .. "max_cost: it was not sent"):format(R, bound and ("%.4g"):format(bound)
      or ("an unknown amount (%s)"):format(estimate.unknown(rep) or "no price for a model"), left),
      { param = "max_cost" }))
  end
end

--- The format of a real-time round's journal (realtime.jsonl's first record).
M.REALTIME_FORMAT = { format = "lbatch-realtime", version = 1 }

-- A real-time round's journal (the answers paid for survive a crash): the
-- answers it holds (custom_id -> record), written back compacted under its
-- format's record (a torn last line goes).
local function open_realtime(jpath)
  local got, old = {}, { M.REALTIME_FORMAT }
  local log = errors.try(journal.open(jpath, function(rec)
    rec = normalize(rec)
    if type(rec.custom_id) ~= "string" then return end
    if not got[rec.custom_id] then old[#old + 1] = rec end
    got[rec.custom_id] = rec
  end, { durable = true }))
  errors.try(log:compact(old))
  return log, got
end

-- Each request without an answer, sent (max_in_flight at once); each
-- answer journaled and synced as it comes. A request that failed on the
-- network or with a retryable status stops the run with its error.
function Run:realtime_send(queue, log, jpath, got)
  local client, opts = self.client, self.opts
  local next_i, failure = 0, nil
  local function worker()
    while not failure do
      next_i = next_i + 1
      local line = queue[next_i]
      if not line then return end
      local v, e = client:request(line.url, line.body, { with_response = true })
      local resp
      if v ~= nil then resp = { status_code = e.status, request_id = e.request_id, body = v }
      elseif e.status and not e.retryable then     -- the service's answer: the line's failure
        resp = { status_code = e.status, request_id = e.request_id,
                 body = { error = { code = e.code, type = e.type, message = e.message, param = e.param } } }
      else
        failure = failure or e
        return
      end
      local rec = results.record_of({ custom_id = line.custom_id, response = resp })
      rec.realtime = true
      local ok, werr = log:append(rec)
      if ok then
        local synced, why = core.fsync(jpath)
        if not synced then ok, werr = nil, errors.io("cannot sync", jpath, why) end
      end
      if not ok then failure = failure or werr return end
      got[line.custom_id] = rec
      if opts.on_step then opts.on_step("realtime", { custom_id = line.custom_id, path = jpath }) end
    end
  end
  local workers = {}
  for i = 1, math.min(#queue, math.max(1, opts.max_in_flight or 8)) do workers[i] = client:spawn(worker) end
  for _, w in ipairs(workers) do
    local _, err = w:join()
    if err then failure = failure or err end
  end
  log:close()
  if failure then throw(failure) end
end

-- Round R's requests through the real-time endpoint, at full price
-- (`finish_realtime`: a few stragglers sent now rather than in another
-- batch). Each answer is journaled (round-R/realtime.jsonl, synced) as it
-- comes, before anything moves on: run again, only the requests without
-- one are sent. A request that failed on the network or with a retryable
-- status (after the client's retries) is not journaled: the run stops
-- with its error, and the next run asks it again.
function Run:realtime(R)
  local dir, st = self.dir, self.state
  local rdir = ("%s/round-%d"):format(dir, R)
  local files = st.rounds[R].files
  check_asks(R, files)
  self:realtime_bound(R, files)
  local jpath = rdir .. "/realtime.jsonl"
  local log, got = open_realtime(jpath)
  local queue, asks = {}, 0
  for _, f in ipairs(files) do
    for line in each_line(f.path) do
      asks = asks + 1
      if not got[line.custom_id] then queue[#queue + 1] = line end
    end
  end
  self:realtime_send(queue, log, jpath, got)
  for g, f in ipairs(files) do
    local path = ("%s/answers-%d.jsonl"):format(rdir, g)
    local fh = create(path)
    for line in each_line(f.path) do write_line(fh, path, got[line.custom_id]) end
    close_synced(fh, path)
  end
  sync(rdir)
  st.rounds[R].batches, st.rounds[R].realtime = 0, asks
  st.phase = "answered"
  save_state(dir, st)
end

-- What is left of max_cost before round R (nil without one); none left
-- stops the run.
function Run:budget(R)
  local st, opts = self.state, self.opts
  if not opts.max_cost then return nil end
  local left = opts.max_cost - st.cost
  if left <= 0 then
    throw(fail("max_cost", ("the flow has cost %.4g, max_cost %.4g: round %d was not sent"):format(st.cost,
      opts.max_cost, R), { param = "max_cost" }))
  end
  return left
end

function Run:progress(batches)
  local cb = self.opts.on_progress
  if not cb then return end
  local st = self.state
  cb({ items = st.items, done = st.done, failed = st.failed, pending = st.pending or {}, round = st.round,
       rounds = #st.rounds, tokens = st.tokens, cost = st.cost, batches = batches })
end

-- the lines of a round's done.jsonl (version 1's `i` read as `index`)
local function each_done(path)
  local it = each_line(path)
  return function()
    local rec = it()
    if rec and rec.index == nil then rec.index, rec.i = rec.i, nil end
    return rec
  end
end

-- the rounds' finished items (their iterators' heads) on fh, in the items'
-- order; the records repaired
local function merge_heads(fh, path, heads)
  local repaired = 0
  while true do
    local best
    for _, h in ipairs(heads) do
      if h.rec and (not best or h.rec.index < best.rec.index) then best = h end
    end
    if not best then break end
    local rec = best.rec
    best.rec = best.it()
    rec.index = nil
    local changed
    rec, changed = results.sanitize(rec)             -- valid UTF-8 whatever the answers held
    if changed then repaired = repaired + 1 end
    write_line(fh, path, rec)
  end
  return repaired
end

-- Every round's finished items, merged into the items' order.
function Run:merge()
  local dir, st = self.dir, self.state
  local path = dir .. "/results.jsonl"
  local heads = {}
  for R = 1, #st.rounds do
    local it = each_done(("%s/round-%d/done.jsonl"):format(dir, R))
    heads[#heads + 1] = { it = it, rec = it() }
  end
  local repaired, err = journal.replace(path, function(fh) return merge_heads(fh, path, heads) end)
  if not repaired then throw(err) end
  st.repaired = repaired
  st.phase = "merged"
  save_state(dir, st)
end

--- The options `run` passes on to each round's pipeline (as `lbatch.pipeline.run` takes them).
M.PIPELINE_OPTIONS = { "max_in_flight", "completion_window", "metadata", "poll_interval", "max_poll_interval",
  "poll_factor", "resubmit", "max_rounds", "max_enqueued_tokens", "max_enqueued_requests", "quota_poll",
  "quota_backoff", "quota_backoff_max", "max_quota_delays", "prices", "discount", "max_failure_ratio",
  "stuck_after", "on_stuck", "stuck_action", "check_disk", "disk_factor", "on_step",
  "recover_window" }

local Results = {}
Results.__index = Results

--- Each item's result `{key, ok, value | error}`, in the items' order.
function Results:each() return each_line(self.path) end

--- The results of a flow that has finished in `dir`.
-- @tparam string dir
-- @treturn table a reader (`:each()`: `{key, ok, value | error}`, in the
-- items' order), or nil and an `io` error when the flow has not finished
function M.results(dir)
  errors.check("flow.results", "dir", dir, "string")
  local path = dir .. "/results.jsonl"
  local fh, msg = io.open(path, "rb")
  if not fh then return nil, errors.io("cannot read", path, msg) end
  fh:close()
  return setmetatable({ path = path }, Results)
end

local function check(name, opts)
  errors.check(name, "opts", opts, "table")
  errors.check(name, "opts.dir", opts.dir, "string")
  errors.check(name, "opts.step", opts.step, "function")
  errors.check(name, "opts.key", opts.key, "function", true)
  if opts.on_change ~= nil and opts.on_change ~= "error" and opts.on_change ~= "ask_again" then
    errors.arg(name, 'on_change must be "error" or "ask_again"', 3)
  end
  local f = opts.flush
  if f ~= nil then
    errors.check(name, "opts.flush", f, "table")
    for _, k in ipairs({ "lines", "seconds" }) do
      local v = f[k]
      if v ~= nil and (type(v) ~= "number" or v ~= v or v < 0) then
        errors.arg(name, "flush." .. k .. " must be a number >= 0", 3)
      end
    end
    if opts.finish_realtime ~= nil or opts.max_cost ~= nil then
      errors.arg(name, "flush does not take finish_realtime or max_cost (yet)", 3)
    end
  end
  local rt = opts.finish_realtime
  if rt ~= nil and (type(rt) ~= "number" or rt ~= rt or rt < 0 or rt == math.huge) then
    errors.arg(name, "finish_realtime must be a number >= 0 (the most asks a round sends in real time)", 3)
  end
end

local function new_run(opts)
  local made, why = core.mkdir(opts.dir)
  if not made then return nil, errors.io("cannot make", opts.dir, why) end
  local client = opts.client
  local prices, perr = estimate.prices(opts.prices)
  if perr then return nil, perr end
  return setmetatable({ opts = opts, dir = opts.dir, client = client, on_change = opts.on_change, prices = prices,
                        flush = opts.flush and true or nil,
                        quota = quota.new({ tokens = opts.max_enqueued_tokens, requests = opts.max_enqueued_requests }),
                        pause = client and function() client:pause() end or nil }, Run)
end

local run_locked

--- Run a flow: every item through `step`, the asks in rounds of batches.
-- Killed at any moment and run again on the same `dir`, it goes on: each
-- ask is sent once, and no answer is lost.
-- @tparam table opts client, dir, items (a .csv with a header row, a
-- .jsonl of objects, a list, or an iterator; read in the first round
-- only, then kept in the journal), step (`function(item, ask)`,
-- deterministic given its answers), key (`function(item)`, stable and
-- unique: default the item's custom_id, id or first column), model (for
-- asks without one), endpoint, limits, max_lines, max_bytes (the shards,
-- as `jsonl.writer`), on_change (`"error"`, default, or `"ask_again"`),
-- on_progress(p) (`{items, done, failed, pending = {[ask n] = asks},
-- round, rounds, tokens, cost, batches}`: batches is the round's
-- pipeline progress while it runs), max_cost with prices (the cost so far,
-- from the answers' usage, and each round's bound), finish_realtime (a
-- round of at most that many asks is sent through the real-time endpoint,
-- at full price, max_in_flight at once; its records have `realtime =
-- true`; on_step("realtime", {custom_id, path}) after each answer is
-- journaled), flush (`{lines, seconds}`: a pass starts, while other
-- shards are out, once the shards back hold that many answers or that
-- long after the oldest came back; each shard its own pipeline, one quota
-- for all), wait_lock (dir is locked for the run: another flow, run or
-- adopt on it fails at once with a `busy` error, code `dir_locked`, naming
-- its holder; wait_lock = seconds waits that long for it), pipeline (more
-- options for each round's pipeline), and the pipeline's own options
-- (`flow.PIPELINE_OPTIONS`)
-- @treturn table the report `{items, done, failed, rounds = {{asks,
-- files, batches, realtime}}, asks, batches, realtime (asks sent in real
-- time), tokens, cost, results (`:each()`),
-- dir}`, or nil and an error
function M.run(opts)
  check("flow.run", opts)
  errors.check("flow.run", "opts.client", opts.client, "table")
  local run, err = new_run(opts)
  if not run then return nil, err end
  local client = opts.client
  local lk, lerr = lock.acquire(run.dir, { wait = opts.wait_lock, sleep = function(s) client:sleep(s) end })
  if not lk then return nil, lerr end
  return lk:release(run_locked(run, opts))
end

-- the flow, its directory locked
function run_locked(run, opts)
  local ok, perr = pcall(function()
    run.state = load_state(run.dir)
    local st = run.state
    if opts.flush and st.phase ~= "merged" and st.phase ~= "finished" then
      st.shards = st.shards or {}
      st.phase = st.round == 0 and "flowing" or st.phase
      local task = run.client:spawn(function()
        local done, why = pcall(run.flow, run)
        return done or errors.thrown(why) or why
      end)
      local v, ferr = task:join()
      if v ~= true then
        throw(errors.is(v) and v or errors.is(ferr) and ferr or fail("flow_failed", tostring(v or ferr)))
      end
    end
    while st.phase ~= "merged" do
      if st.phase == "answered" then run:pass(st.round + 1)
      elseif st.phase == "send" then run:send(st.round)
      elseif st.phase == "realtime" then run:realtime(st.round)
      elseif st.phase == "finished" then run:merge()
      else throw(fail("bad_state", ("%s/flow.json has an unknown phase %s"):format(run.dir, tostring(st.phase))))
      end
    end
  end)
  if not ok then
    perr = errors.thrown(perr) or perr
    if errors.is(perr) then return nil, perr end
    return nil, errors.new({ kind = "task", code = "flow_failed", message = tostring(perr) })
  end
  local st, asks, batches, realtime = run.state, 0, 0, 0
  for _, r in ipairs(st.rounds) do
    asks, batches, realtime = asks + r.asks, batches + (r.batches or 0), realtime + (r.realtime or 0)
  end
  return { items = st.items, done = st.done, failed = st.failed, rounds = st.rounds, asks = asks,
           batches = batches, realtime = realtime, tokens = st.tokens, cost = st.cost, dir = run.dir,
           repaired = st.repaired or 0, results = M.results(run.dir) }
end

--- What a flow's first round will send, and what cannot be known before
-- it runs. Every item runs until its first asks (no request is sent);
-- those are written to `dir` and estimated as `lbatch.estimate` does.
-- @tparam table opts as `run`'s (no client needed): items, step, key,
-- model, limits, prices, discount; dir (a scratch directory)
-- @treturn table `{items, done (items that ask nothing), first = the
-- estimate of the first round's requests, unknown = what cannot be
-- known}`, or nil and an error
function M.estimate(opts)
  check("flow.estimate", opts)
  local run, err = new_run(opts)
  if not run then return nil, err end
  run.state, run.dry = fresh(), true
  local ok, perr = pcall(run.pass, run, 1)
  if not ok then
    perr = errors.thrown(perr) or perr
    if errors.is(perr) then return nil, perr end
    return nil, errors.new({ kind = "task", code = "flow_failed", message = tostring(perr) })
  end
  local st, paths = run.state, {}
  for i, f in ipairs(st.rounds[1].files) do paths[i] = f.path end
  local first, eerr = estimate.files(paths, { prices = opts.prices, discount = opts.discount })
  if not first then return nil, eerr end
  return { items = st.items, done = st.done + st.failed, first = first,
    unknown = "only the first round is known: how many items ask again, and how long their later "
      .. "requests and every answer are, depend on answers that do not exist yet; later rounds "
      .. "cost at least as much again per ask they make" }
end

return M
