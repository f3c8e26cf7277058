--- A pipeline: requests in, merged results out. It shards (lbatch.jsonl),
-- uploads, creates, waits and downloads with at most N jobs in flight, and
-- keeps a journal of every step (written atomically). Killed at any moment
-- and started again on the same journal, it resumes: nothing is uploaded or
-- created twice, no result is lost.
--
--   local report = assert(pipeline.run{ client = client, requests = "questions.csv",
--                                       model = "qwen-plus", dir = "work" })
--   for rec in report.results:each() do ... end
--
-- How a step that may have happened is recognised after a crash:
--   uploading: each shard is uploaded under a name unique to this run; a
--              file of that name in the newest files is the upload.
--   creating:  a shard's file is used by one batch only; a batch with that
--              input file is the create.
-- @module lbatch.pipeline
local core = require "lbatch.core"
local jsonl = require "lbatch.jsonl"
local json = require "lbatch.json"
local csv = require "lbatch.csv"
local results = require "lbatch.results"
local errors = require "lbatch.impl.transport.errors"
local journal = require "lbatch.impl.orchestration.journal"
local service = require "lbatch.impl.api.service"
local rules = require "lbatch.impl.formats.rules"
local recover = require "lbatch.impl.api.recover"
local estimate = require "lbatch.impl.formats.estimate"
local quota = require "lbatch.impl.orchestration.quota"
local lock = require "lbatch.impl.orchestration.lock"
local now = core.now

local try, throw = errors.try, errors.throw

local M = {}

local function fail(message)
  return errors.new({ kind = "invalid", message = "pipeline: " .. message })
end

-- client:pause as a plain function, one per client: LuaJIT's traces of a
-- loop that calls a closure hold to that closure, and a new one every run
-- would have them compiled again
local pausers = setmetatable({}, { __mode = "k" })
local function pauser(client)
  local p = pausers[client]
  if not p then
    p = function() client:pause() end
    pausers[client] = p
  end
  return p
end

-- ------------------------------------------------------------ journal

-- The journal (lbatch.journal, whose pipeline_replay reads its records):
-- a header record, then a record per change. A change costs one short
-- append however many shards there are.
local function open_journal(path)
  local replay, state = journal.pipeline_replay(path)
  local j, err = journal.open(path, replay, { durable = true })
  if not j then return nil, err end
  local st, serr = state()               -- a newer lbatch's journal is refused
  if serr then j:close() return nil, serr end
  return j, nil, st
end

-- the whole state as records, for a compaction
local snapshot = journal.pipeline_records

-- ------------------------------------------------------------ identity

-- A run's id is kept in three places: its journal's header, its stamps on
-- the service (files named RUN-K.jsonl, batches with metadata.lbatch_run),
-- and dir/run.json, written once (aside, synced, renamed, the directory
-- synced) before anything is sent. A journal that lost its header (emptied,
-- cut, deleted) beside a run.json, or beside the shards it wrote, is
-- refused: starting a new run would upload and create everything again.
local function run_file(dir) return dir .. "/run.json" end

local function read_identity(dir)
  local path = run_file(dir)
  local fh = io.open(path, "rb")
  if not fh then return nil end
  local text = fh:read("*a")
  fh:close()
  local ok, v = pcall(json.decode, text)
  if not ok or type(v) ~= "table" or type(v.run) ~= "string" then
    return nil, errors.new({ kind = "invalid", code = "journal_damaged", path = path, message = ("pipeline: %s "
      .. "is not a run's identity (a JSON object with its run): restore it, or remove it if %s holds no run")
      :format(path, dir) })
  end
  return v
end

local function write_identity(dir, id)
  local path = run_file(dir)
  return journal.replace(path, function(fh)
    local ok, werr = fh:write(json.encode({ format = "lbatch-run", version = 1, run = id }), "\n")
    if not ok then return nil, errors.io("cannot write", path, werr) end
    return true
  end)
end

-- how a damaged journal is repaired: adopt from the account (the requests
-- sharded again, or the manifest it was handed)
local function repair_hint(opts, path, id)
  if opts.manifest then
    return ("move %s aside, then rebuild it from the account: pipeline.adopt{run = %q, dir = %q, manifest = "
      .. "(the files this run was handed; a flow's round: flow.json's rounds[R].files)}, and run again")
      :format(path, id or "RUN", opts.dir)
  end
  return ("move %s aside, then rebuild it from the account: lbatch adopt --run %s --dir %s INPUT (with run's "
    .. "sharding options; pipeline.adopt{run = %q, dir = ..., requests = ...}), and run again"):format(path,
      id or "RUN", opts.dir, id or "RUN")
end

-- nil when the journal and the run's identity agree, else the error
local function check_identity(opts, path, state)
  local id, err = read_identity(opts.dir)
  if err then return err end
  if id and state and state.run ~= id.run then
    return errors.new({ kind = "invalid", code = "journal_damaged", path = path, run = id.run, message = ("pipeline: "
      .. "%s is the journal of run %s, but %s says run %s: nothing was sent; put back the run's own journal")
      :format(path, tostring(state.run), run_file(opts.dir), id.run) })
  end
  if state then return nil end
  local shards = not opts.manifest and io.open(opts.dir .. "/requests.jsonl", "rb")
  if shards then shards:close() end
  if not id and not shards then return nil end
  return errors.new({ kind = "invalid", code = "journal_damaged", path = path, run = id and id.run,
    message = ("pipeline: the journal %s is empty, cut in its header or missing, but %s: starting again would "
      .. "upload and create everything again; nothing was sent. To repair: %s%s"):format(path,
      id and ("run " .. id.run .. " was started here (" .. run_file(opts.dir) .. ")")
         or ("the shards of a run are there (" .. opts.dir .. "/requests.jsonl)"),
      repair_hint(opts, path, id and id.run),
      id and "" or " (RUN is the prefix of the run's files' names: lbatch files)") })
end

local function token()
  local f = io.open("/dev/urandom", "rb")
  local bytes = f and f:read(6) or tostring(os.time() + math.random())
  if f then f:close() end
  return (bytes:gsub(".", function(c) return ("%02x"):format(c:byte()) end))
end

-- ------------------------------------------------------------ disk

local size = require "lbatch.impl.formats.size"
local function size_of(path) return size.file(path) or 0 end
local human = size.human

-- The disk must hold what the run will write: copies of the requests and
-- the answers (an output file is typically two to three times its input:
-- `disk_factor`, default 3). Checked before any work, so a full disk is a
-- clear error at the start and not a failed download halfway.
local function room(opts, dir, input_bytes, copies)
  if opts.check_disk == false or input_bytes <= 0 then return true end
  local need = input_bytes * (copies + (opts.disk_factor or 3))
  local free, why = core.disk_free(dir)
  if not free then return nil, errors.io("cannot tell the free space of", dir, why) end
  if free < need then
    return nil, errors.new({ kind = "io", code = "disk_full", path = dir, message = ("pipeline: %s has %s free; "
      .. "this run needs about %s (%s of requests, answers up to %gx that); free some space or set disk_factor")
      :format(dir, human(free), human(need), human(input_bytes), opts.disk_factor or 3) })
  end
  return true
end

-- ------------------------------------------------------------ sharding

-- requests: a .jsonl or .csv path, a list of requests, or an iterator
-- returning them; a request is {custom_id, body[, url]} or a full line.
-- The shards follow the rules of `limits`, by default the client's (its
-- provider's or region's profile: sizes, endpoints, Zhipu's /v4 urls).
-- one request into the writer (the module's function, not a closure per
-- run, for LuaJIT's traces of the loops that call it: see pauser)
local function add_request(w, client, r)
  if type(r) ~= "table" then throw(fail("a request must be a table")) end
  client:pause()                       -- a host's frame goes on
  local ok, err
  if r.method then ok, err = w:request(r) else ok, err = w:add(r.custom_id, r.body, r.url) end
  if not ok then throw(err) end
end

local function shard(opts, dir, client)
  local limits = opts.limits or client.config.limits
  local w = jsonl.writer({ path = dir .. "/requests.jsonl", endpoint = opts.endpoint, model = opts.model,
                           limits = limits, max_lines = opts.max_lines, max_bytes = opts.max_bytes,
                           unique = "all" })
  local src = opts.requests
  local ok, err = pcall(function()
    if type(src) == "string" and src:find("%.csv$") then
      w:close()
      local m, e = csv.to_jsonl(src, { path = dir .. "/requests.jsonl", model = opts.model,
        system = opts.system, endpoint = opts.endpoint, max_lines = opts.max_lines,
        max_bytes = opts.max_bytes, unique = "all", limits = limits, header = opts.header })
      if not m then throw(e) end
      w = { close = function() return m end }
    elseif type(src) == "string" then
      local fh, msg = io.open(src, "rb")
      if not fh then throw(errors.io("cannot read", src, msg)) end
      local max_line = w.profile.max_line_bytes
      local okr, rerr = pcall(function()
        for n, line in rules.lines(fh, max_line) do
          if not line then      -- too long to keep: the writer's rule, not a silent skip
            throw(errors.new({ kind = "invalid", code = "line_too_large", message = ("%s line %d is larger than "
              .. "the %d bytes allowed (%s)"):format(src, n, max_line, w.profile.name) }))
          elseif line:find("%S") then
            local okj, r = pcall(json.decode, line)
            if not okj then throw(fail(("%s line %d is not JSON"):format(src, n))) end
            add_request(w, client, r)
          end
        end
      end)
      fh:close()
      rerr = errors.thrown(rerr) or rerr
      if not okr then throw(errors.is(rerr) and rerr or errors.io("cannot read", src, rerr)) end
    elseif type(src) == "table" then
      for _, r in ipairs(src) do add_request(w, client, r) end
    elseif type(src) == "function" then
      for r in src do add_request(w, client, r) end
    else
      throw(fail("requests must be a path, a list or an iterator"))
    end
  end)
  local manifest, cerr = w:close()
  if not ok then
    err = errors.thrown(err) or err
    return nil, errors.is(err) and err or fail(tostring(err))
  end
  if not manifest then return nil, cerr end
  if #manifest.files == 0 then return nil, fail("no requests") end
  return manifest
end

-- ------------------------------------------------------------ what a run was asked

-- The journal's header holds the run's fingerprint (`fp`): the options
-- that shape a request (SHAPING: the answers are for other questions when
-- one changes) or only its sharding and batches (SHARDING), a hash of the
-- source file's bytes (a quick check for an unchanged file) and a hash of
-- every request line, in order (`input`, with `requests`, their count).
-- A line's hash is that of its request (custom_id, method, url, body) with
-- the keys of every object in order, so the same request has the same hash
-- however it was written. The lines themselves are the run's request
-- files (`view`: its first-round shards, or the whole input of a rerun),
-- which a rerun compares with the new input's, custom_id by custom_id.
local SHAPING = { "model", "system", "endpoint", "limits", "header" }
local SHARDING = { "max_lines", "max_bytes", "completion_window", "metadata" }
local CHUNK = 1048576

local hex = core.hex

-- v as text that is the same for the same value (object keys in order)
local function by_text(a, b) return tostring(a) < tostring(b) end
local function canon(v)
  local t = type(v)
  if t == "table" then
    if v == json.null then return "null" end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, by_text)             -- (no closure per call: each line's hash runs this)
    local parts = {}
    for i, k in ipairs(keys) do parts[i] = json.encode(tostring(k)) .. ":" .. canon(v[k]) end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif t == "string" then return json.encode(v)
  elseif t == "function" then return "a function"
  elseif t == "number" then       -- 1 and 1.0 alike, on every Lua
    if v == math.floor(v) and math.abs(v) < 2 ^ 53 then return ("%.0f"):format(v) end
    return ("%.17g"):format(v)
  end
  return tostring(v)
end

local function options_fp(opts, client)
  local o = {}
  for _, list in ipairs({ SHAPING, SHARDING }) do
    for _, k in ipairs(list) do if opts[k] ~= nil then o[k] = canon(opts[k]) end end
  end
  o.limits = canon(opts.limits or client.config.limits)
  return o
end

-- an option's value in a message: unquoted, cut at 60 characters
local function shown(v)
  if v == nil then return "not set" end
  v = v:gsub('^"(.*)"$', "%1")
  if #v > 60 then
    local cut = 58
    while cut > 1 and v:byte(cut) >= 0x80 and v:byte(cut) < 0xC0 do cut = cut - 1 end   -- not inside a character
    v = v:sub(1, cut - 1) .. "..."
  end
  return v
end

-- what changed between two option fingerprints: {"model was a, now b", ...}
local function differences(was, now_o, keys)
  local out = {}
  for _, k in ipairs(keys) do
    if was[k] ~= now_o[k] then out[#out + 1] = ("%s was %s, now %s"):format(k, shown(was[k]), shown(now_o[k])) end
  end
  return out
end

local function paths_of(manifest)
  local t = {}
  for i, f in ipairs(manifest.files) do t[i] = f.path end
  return t
end

-- the hash of the source's bytes, read as they are: a path, or the files
-- of a manifest (nil for a list or an iterator: they are compared line by line)
local function source_hash(opts, pause)
  local src, paths = opts.requests
  if opts.manifest then paths = paths_of(opts.manifest)
  elseif type(src) == "string" then paths = { src }
  else return nil end
  local acc = "lbatch-source"
  for _, p in ipairs(paths) do
    local fh = io.open(p, "rb")
    if not fh then return nil end
    while true do
      local data = fh:read(CHUNK)
      if not data then break end
      acc = core.hmac_sha256(acc, data)
      pause()
    end
    fh:close()
    acc = core.hmac_sha256(acc, "\0")
  end
  return hex(acc)
end

-- a request line's custom_id and the 48-bit hash of its request
local function line_hash(line)
  local ok, r = pcall(json.decode, line)
  if not ok or type(r) ~= "table" then return nil end
  local d = core.hmac_sha256("lbatch-line", canon({ r.custom_id, r.method, r.url, r.body }))
  local h = 0
  for i = 1, 6 do h = h * 256 + d:byte(i) end
  return r.custom_id ~= nil and tostring(r.custom_id) or nil, h
end

-- each request line of the files: fn(id, hash, line, arg); a pause every 4
-- lines and every file, so that a host's step ends soon after its budget
local function each_line(paths, fn, pause, arg)
  local n = 0
  for _, p in ipairs(paths) do
    local fh, msg = io.open(p, "rb")
    if not fh then return nil, errors.io("cannot read", p, msg) end
    -- (read, not fh:lines(): that makes an iterator per file, and LuaJIT
    -- then compiles a new side trace of this loop for each file)
    local line = fh:read("*l")
    while line do
      local id, h = line_hash(line)
      if id then fn(id, h, line, arg) end
      n = n + 1
      if n % 4 == 0 then pause() end
      line = fh:read("*l")
    end
    fh:close()
    pause()
  end
  return true
end

-- the hash of the whole input (every line's id and hash, in order) and its count
-- (a function of the module with its state in `st`, not a closure per
-- call: LuaJIT's trace of each_line's loop holds to the function it calls)
local function hash_line(id, h, _, st)
  st.n = st.n + 1
  local parts = st.parts
  parts[#parts + 1] = id .. "\0" .. ("%.0f"):format(h) .. "\n"
  if #parts == 4096 then st.acc, st.parts = core.hmac_sha256(st.acc, table.concat(parts)), {} end
end

local function input_hash(paths, pause)
  local st = { acc = "lbatch-input", n = 0, parts = {} }
  local ok, err = each_line(paths, hash_line, pause, st)
  if not ok then return nil, err end
  return hex(core.hmac_sha256(st.acc, table.concat(st.parts))), st.n
end

-- the files of the run's requests, in input order
local function view_of(state)
  if state.view then return state.view end
  local t = {}
  for _, s in ipairs(state.shards) do if s.round == 1 then t[#t + 1] = s.path end end
  return t
end

-- ------------------------------------------------------------ the canary's cut

-- A canary (opts.canary = {lines, check, min_ok}): a sample of the input
-- run first, its answers judged, the rest released only when enough pass.
-- Its state is the journal header's `canary` (its own `version`): pending,
-- passed or failed, with the verdict; a shard of it has `canary = true`.
local CANARY_VERSION, CANARY_MIN_OK = 1, 0.95

-- opts.canary checked (a wrong value is a programming error: it raises)
local function check_canary(c)
  if c == nil then return end
  errors.check("pipeline.run", "opts.canary", c, "table")
  if type(c.lines) ~= "number" or c.lines < 1 or c.lines ~= math.floor(c.lines) then
    errors.arg("pipeline.run", "opts.canary.lines must be a whole number of requests, 1 or more")
  end
  errors.check("pipeline.run", "opts.canary.check", c.check, "function", true)
  if c.min_ok ~= nil and (type(c.min_ok) ~= "number" or not (c.min_ok >= 0 and c.min_ok <= 1)) then
    errors.arg("pipeline.run", "opts.canary.min_ok must be a share, from 0 to 1")
  end
end

-- the 0-based line of the input that is the canary's j-th (0-based) of `want`, of `n`
local function canary_pick(j, n, want) return math.floor(j * n / want) end

-- The `n` request lines of `paths` cut in two, in dir: canary.jsonl holds
-- `want` of them spread evenly (the lines floor(j * n / want), j = 0 to
-- want - 1: the same input gives the same sample), rest.jsonl the others.
-- Their manifests; throws.
local function cut_canary(opts, client, paths, n, dir)
  local want = math.min(opts.canary.lines, n)
  local function writer(name)
    return jsonl.writer({ path = dir .. "/" .. name, endpoint = opts.endpoint, unique = "all",
      limits = opts.limits or client.config.limits, max_lines = opts.max_lines, max_bytes = opts.max_bytes })
  end
  local cw, rw = writer("canary.jsonl"), writer("rest.jsonl")
  local i, j, pick = 0, 0, 0
  try(each_line(paths, function(_, _, line)
    if i == pick and j < want then
      try(cw:line(line))
      j = j + 1
      pick = canary_pick(j, n, want)
    else
      try(rw:line(line))
    end
    i = i + 1
  end, function() client:pause() end))
  return try(cw:close()), try(rw:close())
end

-- The manifest cut for a canary (its shards first, each `canary = true`)
-- and the canary's state; the manifest's own files removed unless they were
-- handed in (`keep`). Nil without a canary (or requests); throws.
local function with_canary(opts, client, manifest, n, dir, keep)
  if not opts.canary or n == 0 then return nil end
  local canary, rest = cut_canary(opts, client, paths_of(manifest), n, dir)
  if not keep then
    for _, p in ipairs(paths_of(manifest)) do os.remove(p) end
  end
  local files = {}
  for _, f in ipairs(canary.files) do f.canary = true files[#files + 1] = f end
  for _, f in ipairs(rest.files) do files[#files + 1] = f end
  return { files = files, lines = manifest.lines }, { version = CANARY_VERSION, state = "pending",
    lines = canary.lines, rest = rest.lines, min_ok = opts.canary.min_ok or CANARY_MIN_OK,
    has_check = opts.canary.check ~= nil }
end

-- ------------------------------------------------------------ a rerun

local function changed(message)
  return errors.new({ kind = "invalid", code = "run_changed", param = "on_change", message = "pipeline: " .. message })
end

-- the groups of answers joined to the run's requests: each first-round
-- shard with its own answers and those of its resubmissions (later rounds
-- first: their answers are newer), or, for a rerun, its whole input with
-- the answers it sent for and those it kept from the run before
local function groups_of(state)
  local groups, by_path = {}, {}
  if state.view then
    groups[1] = { inputs = state.view, output = {}, errors = {} }
  end
  for _, s in ipairs(state.shards) do
    if s.round == 1 and not state.view then
      by_path[s.path] = { inputs = s.path, output = {}, errors = {} }
      groups[#groups + 1] = by_path[s.path]
    end
  end
  for i = #state.shards, 1, -1 do
    local s = state.shards[i]
    local g = state.view and groups[1] or by_path[s.origin or s.path]
    if g then
      if s.output then g.output[#g.output + 1] = s.output end
      if s.error then g.errors[#g.errors + 1] = s.error end
    end
  end
  if state.kept then
    local g = groups[1]
    g.output[#g.output + 1], g.errors[#g.errors + 1] = state.kept.output, state.kept.errors
  end
  return groups
end

-- an answer line's custom_id
local function answer_id(line)
  local id = core.json_string(line, "custom_id")
  if id == false then
    local ok, r = pcall(json.decode, line)
    id = ok and type(r) == "table" and r.custom_id
  end
  if type(id) == "string" then return id end
end

local KEEP = -1     -- (a line's hash is never negative)

-- the answers of the ids marked KEEP in index, copied from the run's answer
-- files (the first one of an id, as the reader takes it; each taken from
-- index as it is copied): {output, errors}
local function keep_answers(groups, index, sub, pause)
  local n = 0
  local out = { output = sub .. "/kept.output.jsonl", errors = sub .. "/kept.errors.jsonl" }
  for _, kind in ipairs({ "output", "errors" }) do
    local f, msg = io.open(out[kind], "wb")
    if not f then throw(errors.io("cannot write", out[kind], msg)) end
    for _, g in ipairs(groups) do
      for _, p in ipairs(g[kind]) do
        local fh, rmsg = io.open(p, "rb")
        if not fh then throw(errors.io("cannot read", p, rmsg)) end
        for line in fh:lines() do
          local id = answer_id(line)
          if id and index:get(id) == KEEP then index:take(id) f:write(line, "\n") end   -- the first only
          n = n + 1
          if n % 64 == 0 then pause() end
        end
        fh:close()
      end
    end
    local ok, cerr = f:close()
    if not ok then throw(errors.io("cannot write", out[kind], cerr)) end
  end
  return out
end

-- The next run on a dir whose input changed (the old run done): the lines
-- that are new or changed are its shards, the answers of the unchanged
-- ones are kept (copied aside), those of requests no longer asked dropped.
local function next_run(ctx, state, view)
  local opts, sub, pause = ctx.opts, ctx.sub, pauser(ctx.client)
  local made, why = core.mkdir(sub)
  if not made then throw(errors.io("cannot make", sub, why)) end
  local w = jsonl.writer({ path = sub .. "/send.jsonl", endpoint = opts.endpoint, unique = "all",
    limits = opts.limits or ctx.client.config.limits, max_lines = opts.max_lines, max_bytes = opts.max_bytes })
  -- one index: custom_id -> the old line's hash, then KEEP once the new line is the same
  local old, before = core.idmap(), 0
  local c = { reused = 0, added = 0, changed = 0 }
  try(each_line(view_of(state), function(id, h) if old:put(id, h) then before = before + 1 end end, pause))
  try(each_line(view, function(id, h, line)
    local was = old:take(id)
    if was == h then old:put(id, KEEP) c.reused = c.reused + 1
    else
      if was then c.changed = c.changed + 1 else c.added = c.added + 1 end
      try(w:line(line))
    end
  end, pause))
  c.dropped = before - c.reused - c.changed
  local manifest = try(w:close())
  local kept = keep_answers(groups_of(state), old, sub, pause)
  old:clear()
  local cut, canary = with_canary(opts, ctx.client, manifest, manifest.lines, sub)
  manifest = cut or manifest
  local new = { version = 1, run = ctx.tok, phase = "running", fp = ctx.fp, view = view, kept = kept,
                change = c, previous = state.run, shards = {}, canary = canary }
  for i, f in ipairs(manifest.files) do
    new.shards[i] = { k = i, path = f.path, name = ctx.tok .. "-" .. i .. ".jsonl", lines = f.lines,
      model = f.model, endpoint = f.endpoint, round = 1, step = "written", canary = f.canary }
  end
  if #new.shards == 0 then new.phase = "done" end
  return new
end

-- the old journal, copied beside it before it is written over: kept, never deleted
local function archive(path, state)
  local to = path:gsub("%.jsonl$", "") .. "-" .. state.run .. ".jsonl"
  local src, msg = io.open(path, "rb")
  if not src then return nil, errors.io("cannot read", path, msg) end
  local text = src:read("*a")
  src:close()
  local dst
  dst, msg = io.open(to, "wb")
  local ok = dst and dst:write(text)
  if ok then ok, msg = dst:close() elseif dst then dst:close() end
  if not ok then return nil, errors.io("cannot write", to, msg) end
  return to
end

-- a rerun's copy of the input, not needed: removed
local function discard(paths, sub)
  for _, p in ipairs(paths) do os.remove(p) end
  os.remove(sub)
end

local function unquote(list) return table.concat(list, "; ") end

-- The input as it is now, sharded into ctx.sub: its files and their hash.
local function input_now(ctx)
  local opts, paths = ctx.opts
  if opts.manifest then
    paths = paths_of(opts.manifest)
  else
    if type(opts.requests) == "string" then
      local fits, ferr = room(opts, opts.dir, size_of(opts.requests), 1)
      if not fits then return nil, ferr end
    end
    local made, why = core.mkdir(ctx.sub)
    if not made then return nil, errors.io("cannot make", ctx.sub, why) end
    local manifest, err = shard(opts, ctx.sub, ctx.client)
    if not manifest then os.remove(ctx.sub) return nil, err end
    paths = paths_of(manifest)
  end
  local input, n = input_hash(paths, pauser(ctx.client))
  if not input then
    if not opts.manifest then discard(paths, ctx.sub) end
    return nil, n
  end
  ctx.fp.input, ctx.fp.requests = input, n
  return paths, input
end

-- A run on a dir that has a journal: the same run (resumed, or done), the
-- next one (only the new and changed requests sent) or an error that names
-- what changed. Returns the state to go on with (nil: a new run) and what
-- changed, or nil and an error.
local function rerun(ctx, state, path)
  local opts, dir = ctx.opts, ctx.opts.dir
  if opts.on_change == "fresh" then
    local kept, err = archive(path, state)
    if not kept then return nil, nil, err end
    return nil, { rerun = true, fresh = true, archived = kept, notes = {}, unfinished = state.phase ~= "done" }
  end
  if not state.fp then return state, { rerun = true, fingerprint = "unknown", notes = {} } end
  -- no requests given: the journal's are the run's
  if opts.requests == nil and not opts.manifest then return state, { rerun = true, notes = {} } end
  local shaping = differences(state.fp.options, ctx.fp.options, SHAPING)
  local change = { rerun = true, notes = differences(state.fp.options, ctx.fp.options, SHARDING) }
  if #shaping > 0 and opts.on_change ~= "reuse" then
    return nil, nil, changed(("%s was run with other requests: %s. Its answers are not for these: start a new run "
      .. "(--fresh, on_change = \"fresh\"; the old journal is kept), or keep only the answers whose request line "
      .. "is unchanged (--reuse, on_change = \"reuse\"; with another model or system prompt, none)"):format(
      dir, unquote(shaping)))
  end
  if #shaping == 0 and ctx.fp.source and ctx.fp.source == state.fp.source then return state, change end
  local view, input = input_now(ctx)
  if not view then return nil, nil, input end
  if #shaping == 0 and input == state.fp.input then
    if not opts.manifest then discard(view, ctx.sub) end
    state.fp.source = ctx.fp.source          -- the same requests, written otherwise: known next time
    return state, change
  end
  if state.phase ~= "done" then
    if not opts.manifest then discard(view, ctx.sub) end
    return nil, nil, changed(("%s holds a run that has not finished, and its input or options changed since it "
      .. "started: run it again as it was to finish it, or start a new run (--fresh, on_change = \"fresh\"; "
      .. "the old journal is kept)"):format(dir))
  end
  local ok, new = pcall(next_run, ctx, state, view)
  if not ok then return nil, nil, errors.thrown(new) or fail(tostring(new)) end
  local kept, err = archive(path, state)
  if not kept then return nil, nil, err end
  change.archived, change.shaping = kept, shaping
  for k, v in pairs(new.change) do change[k] = v end
  return new, change
end

-- ------------------------------------------------------------ one shard

local PARTIAL = service.PARTIAL

local Run = {}
Run.__index = Run

-- A change is appended at the end of the loop's turn (one write for all
-- the shards that moved), before any request made in that turn goes out.
function Run:save(s) self.dirty[s] = true end

-- the steps whose request goes out in the next turn: their record must
-- survive a crash of the machine (fsync) before it does
local IN_FLIGHT = { uploading = true, creating = true }

-- A journal that cannot be written stops the run at once: every worker is
-- stopped, so that no request made in this turn goes out (its transfer is
-- dropped before the loop's next step). What was sent before is in the
-- journal as in flight, and the next run recovers it.
function Run:halt(err)
  self.failure = self.failure or err
  if not self.tripped then
    self.tripped = err
    for _, w in ipairs(self.workers) do w:cancel() end
  end
end

function Run:flush()
  if next(self.dirty) then
    -- (sync counts: a local that turns from false to true is a change of
    -- type to LuaJIT, and its trace of this loop would be aborted)
    local recs, sync = {}, 0
    for k, s in ipairs(self.state.shards) do
      if self.dirty[s] then
        recs[#recs + 1] = journal.shard_record(k, s)
        if IN_FLIGHT[s.step] then sync = sync + 1 end
      end
    end
    self.dirty = {}
    local ok, err = self.log:append_list(recs)
    if ok and sync > 0 then ok, err = self.log:sync() end
    -- past 16 changes a shard (a shard's whole life takes about 8), the
    -- journal is written again as the live state: it stays small and
    -- replays fast at any number of shards, and a host's frame rarely pays
    -- for the rewrite (about 2 ms at 100 shards)
    if ok and self.log.appended > 16 * #self.state.shards + 1024 then
      ok, err = self.log:compact(snapshot(self.state))
    end
    if not ok then self:halt(err) end
  end
  if self.moved then
    self.moved = false
    self:report_progress()
  end
end

function Run:hook(step, s)
  if self.opts.on_step then self.opts.on_step(step, s) end
end

-- per-call options that report a shard's transfer to opts.on_transfer
-- (the closure is made apart: a function that returns while a local of
-- it is captured ends a LuaJIT trace, and this one runs for every transfer)
local function transfer_options(cb, s, direction)
  return { on_progress = function(done, total) cb(s.name, direction, done, total) end }
end
function Run:transfer_watch(s, direction)
  local cb = self.opts.on_transfer
  if not cb then return nil end
  return transfer_options(cb, s, direction)
end

-- progress is summed up once per turn, however many shards moved
function Run:progress() self.moved = true end

function Run:report_progress()
  local cb = self.opts.on_progress
  if not cb then return end
  local p = { jobs = {}, shards = #self.state.shards, total = 0, completed = 0, failed = 0,
              elapsed = os.time() - self.started }
  for _, s in ipairs(self.state.shards) do
    local st = s.status or s.step
    p.jobs[st] = (p.jobs[st] or 0) + 1
    local c = s.counts
    if s.round == 1 then p.total = p.total + s.lines end
    if c then p.completed, p.failed = p.completed + (c.completed or 0), p.failed + (c.failed or 0) end
  end
  local done = p.completed + p.failed
  if done > 0 and done < p.total then p.eta = math.floor(p.elapsed * (p.total - done) / done) end
  cb(p)
end

-- What an interrupted step made, if the service has it: the file this run
-- uploaded under a shard's name, the batch made from its file. A failure
-- to look is thrown: doing the step again could make a second one.
local function looked(v, err)
  if err then throw(err) end
  return v
end

-- A step in flight when a run died may still be being made by the
-- service: it is looked for over `recover_window` seconds (default
-- RECOVER_WINDOW) before it is sent again.
local RECOVER_WINDOW = 45

function Run:look_within(look)
  local client = self.client
  local window = self.opts.recover_window or RECOVER_WINDOW
  return looked(recover.within(look, window, function(t) client:sleep(t) end, now))
end

-- the shard's upload, by its stamps: the run's name for the shard and all
-- its bytes (a Together upload cut after its first step leaves a file of
-- that name with none)
function Run:find_upload(s)
  local client = self.client
  local want = { filename = s.name, bytes = size_of(s.path) }
  return self:look_within(function()
    return recover.upload(function(q) return client:list_files(q) end, want)
  end)
end

-- the shard's batch: the one made from its file (a shard's file is used
-- by one batch only)
function Run:find_batch(file_id)
  local client = self.client
  return self:look_within(function()
    return recover.batch(function(q) return client:list_batches(q) end, { input_file_id = file_id })
  end)
end

-- the shard's estimate (tokens, requests, the most it may cost), made once
-- when a quota or the cost cap needs it
function Run:estimate(s)
  if s.tokens then return s end
  local opts = self.opts
  local rep = try(estimate.files({ s.path }, { prices = opts.prices, discount = opts.discount }))
  local t = rep.totals
  s.tokens, s.requests = t.input_tokens or 0, rep.requests
  s.cost_max = t.input_cost and t.output_cost_max and t.input_cost + t.output_cost_max
  if opts.max_cost and not s.cost_max then
    throw(errors.new({ kind = "invalid", code = "max_cost_unknown", param = "prices", message = ("pipeline: "
      .. "%s cannot be costed (%s): max_cost needs a price for each model and a bound on each answer")
      :format(s.name, estimate.unknown(rep)) }))
  end
  return s
end

local function embeddings(s) return (s.endpoint or ""):find("embeddings", 1, true) ~= nil end

-- Stop new work: the first reason wins, every other worker is stopped
-- (what they were doing is in the journal: a run on the same dir resumes).
function Run:trip(err)
  if not self.tripped then
    self.tripped = err
    local me = self.client.scheduler.loop:current()
    for _, w in ipairs(self.workers) do
      if w ~= me then w:cancel() end
    end
  end
  throw(self.tripped)
end

-- an account that cannot work (arrears, no quota, a refused key) stops the run
function Run:stop_if_account_error(code, message, status)
  if service.ACCOUNT[code] then
    self:trip(errors.new({ kind = "http", status = status, code = code, account = true,
      message = ("pipeline stopped: the account cannot run batches (%s): %s"):format(code, tostring(message)) }))
  end
end

-- Wait until the shard may be created: it fits its model's quota, and the
-- cost cap holds what was committed so far and this shard.
function Run:admission(s)
  local opts, q = self.opts, self.quota
  if opts.max_cost or q:limited(s.model) then self:estimate(s) end
  while not q:fits(s.model, s.tokens, s.requests, embeddings(s)) do
    if self.tripped then throw(self.tripped) end
    self.client:sleep(self.quota_poll)
    if q:limited(s.model) then self:estimate(s) end
  end
  -- a shard is charged once: created again after a quota refused it (its
  -- batch failed, nothing run), it spends no more than before
  self.charged = self.charged or {}
  if opts.max_cost and not self.charged[s] then
    if self.committed + s.cost_max > opts.max_cost then
      self:trip(errors.new({ kind = "invalid", code = "max_cost", param = "max_cost", message = ("pipeline: "
        .. "%s would bring the run to %.4g, past max_cost %.4g (%.4g committed)"):format(s.name,
          self.committed + s.cost_max, opts.max_cost, self.committed) }))
    end
    self.committed = self.committed + s.cost_max
    self.charged[s] = true
  end
  q:admit(s.model, s.tokens, s.requests, embeddings(s))
  self.admitted[s] = true
end

function Run:release(s)
  if self.admitted[s] then
    self.admitted[s] = nil
    self.quota:release(s.model, s.tokens, s.requests, embeddings(s))
  end
end

-- Refused by a quota (a failed batch or a create): created again from the
-- same uploaded file once work of its model ends, with backoff; a delay,
-- not a failure.
function Run:refused(s, message)
  local q, opts = self.quota, self.opts
  q:learn(s.model, message)
  s.delays = (s.delays or 0) + 1
  if s.delays > (opts.max_quota_delays or 100) then
    throw(errors.new({ kind = "http", code = "token_limit_exceeded", message = ("pipeline: %s refused by the "
      .. "quota %d times: %s"):format(s.name, s.delays - 1, tostring(message)) }))
  end
  s.step, s.batch_id, s.status = "uploaded", nil, nil
  self:save(s)
  self:progress()
  self:hook("quota_delay", s)
  local gen, t0 = q:ended(s.model), now()
  while q:ended(s.model) == gen and q:model(s.model).jobs > 0 do
    if self.tripped then throw(self.tripped) end
    self.client:sleep(self.quota_poll)
  end
  local backoff = math.min(opts.quota_backoff_max or 60, (opts.quota_backoff or 1) * 2 ^ math.min(s.delays - 1, 10))
  local left = backoff - (now() - t0)
  if left > 0 then self.client:sleep(left) end
end

-- A step the service refused (a 4xx answer) made nothing: the journal
-- says so (the shard back at `step`), and a later run sends it without
-- looking for it first. An account that cannot work stops the run; any
-- other failure is thrown.
function Run:failed_step(s, err, step)
  if err.status and err.status >= 400 and err.status < 500 then
    s.step = step
    self:save(s)
  end
  self:stop_if_account_error(err.code, err.message, err.status)
  throw(err)
end

function Run:upload(s)
  local f
  if s.step == "uploading" then f = self:find_upload(s) end
  if not f then
    if self.tripped then throw(self.tripped) end
    s.step = "uploading"
    self:save(s)
    self:hook("before_upload", s)
    local err
    f, err = self.client:upload(s.path, { filename = s.name }, self:transfer_watch(s, "up"))
    if not f then self:failed_step(s, err, "written") end
    self:hook("after_upload", s)
  end
  s.file_id, s.step = f.id, "uploaded"
  self:save(s)
end

-- a canary shard's batch says so, with the canary's size (when the
-- metadata has room: user keys first), so that adopt knows the run was cut
local function canary_mark(m, s, c)
  if not (s.canary and c) then return end
  local keys = 0
  for _ in pairs(m) do keys = keys + 1 end
  if keys < service.METADATA.max_keys - 1 then m.lbatch_canary = ("%d"):format(c.lines) end   -- (ds_name may follow)
end

-- every batch of a run carries its run and shard (and, on DashScope, a
-- name), so a lost journal can be rebuilt from the account (adopt)
function Run:metadata(s)
  local metadata = self.opts.metadata
  if type(metadata) == "function" then metadata = metadata(s) end
  local m = {}
  for k, v in pairs(metadata or {}) do m[k] = v end
  -- %d: a shard number read back from the journal is a float on Lua 5.3+ (6.0)
  m.lbatch_run, m.lbatch_shard = self.state.run, ("%d"):format(s.k)
  canary_mark(m, s, self.state.canary)
  if self.dialect == "dashscope" and m.ds_name == nil then
    m.ds_name = "lbatch-" .. self.state.run .. "-" .. m.lbatch_shard
  end
  -- DashScope calls back the URL a batch names; OpenAI's webhooks go to
  -- the URL set in the project's settings, not per batch
  local n = self.opts.notify
  if n and n.url and self.dialect == "dashscope" and m.ds_batch_finish_callback == nil then
    m.ds_batch_finish_callback = n.url
  end
  return m
end

function Run:create(s)
  local client, opts = self.client, self.opts
  local b
  if s.step == "creating" then b = self:find_batch(s.file_id) end
  if b then
    if not self.admitted[s] then
      self.quota:admit(s.model, s.tokens, s.requests, embeddings(s))
      self.admitted[s] = true
    end
  else
    self:admission(s)
    s.step = "creating"
    self:save(s)
    local err
    b, err = client:create({ input_file_id = s.file_id, endpoint = s.endpoint,
      completion_window = opts.completion_window, metadata = self:metadata(s) })
    if not b then
      self:release(s)
      if quota.refused(err.code) then return self:refused(s, err.message) end
      self:failed_step(s, err, "uploaded")
    end
    self:hook("after_create", s)
  end
  s.batch_id, s.step, s.status = b.id, "created", b.status
  self:save(s)
  self:progress()
end

function Run:await(s)
  local client, opts = self.client, self.opts
  if not self.admitted[s] then       -- in flight from an earlier run
    if self.quota:limited(s.model) then self:estimate(s) end
    self.quota:admit(s.model, s.tokens, s.requests, embeddings(s))
    self.admitted[s] = true
  end
  self:hook("waiting", s)
  local stuck = opts.stuck_action == "cancel_resubmit"
  local on_stuck
  if opts.on_stuck or stuck then
    on_stuck = function(batch, seconds)
      s.stuck = batch.status
      self:save(s)
      if opts.on_stuck then opts.on_stuck(batch, seconds) end
      if stuck then client:spawn(function() client:cancel(batch.id) end) end
    end
  end
  local b, err = client:wait(s.batch_id, {
    interval = opts.poll_interval, max_interval = opts.max_poll_interval, factor = opts.poll_factor,
    stuck_after = opts.stuck_after, on_stuck = on_stuck,
    on_progress = function(batch)
      s.status, s.counts = batch.status, batch.request_counts
      self:progress()
    end,
  })
  self:release(s)
  if not b then throw(err) end
  local first = type(b.errors) == "table" and type(b.errors.data) == "table" and b.errors.data[1]
  if b.status == "failed" and type(first) == "table" and quota.refused(first.code) then
    return self:refused(s, first.message)
  end
  if b.status == "failed" and type(first) == "table" then self:stop_if_account_error(first.code, first.message) end
  s.status, s.counts, s.step = b.status, b.request_counts, "finished"
  s.usage = type(b.usage) == "table" and b.usage or nil   -- the batch's own (OpenAI): the report's tokens
  s.times = { created = b.created_at, in_progress = b.in_progress_at,   -- the report's timeline
              ended = b.completed_at or b.failed_at or b.expired_at or b.cancelled_at }
  s.output_file_id, s.error_file_id = b.output_file_id, b.error_file_id
  if b.errors and b.errors.data then s.errors = b.errors.data end
  self:save(s)
end

-- the code and message of an error file's first line
local function first_error(path)
  local fh = path and io.open(path, "rb")
  if not fh then return nil end
  local line = fh:read("*l")
  fh:close()
  local ok, rec = pcall(json.decode, line or "")
  if not ok or type(rec) ~= "table" then return nil end
  local e = type(rec.error) == "table" and rec.error
  if not e and type(rec.response) == "table" and type(rec.response.body) == "table" then
    e = type(rec.response.body.error) == "table" and rec.response.body.error
  end
  if e then return e.code, e.message end
end

-- a shard's file downloaded to path (a method, not a closure in download:
-- LuaJIT cannot compile a function that closes over its locals)
function Run:fetch(s, id, path)
  local o = self:transfer_watch(s, "down") or {}
  o.path = path
  return try(self.client:content(id, o))
end

function Run:download(s)
  local opts = self.opts
  local base = s.path:gsub("%.jsonl$", "")
  if s.output_file_id then s.output = self:fetch(s, s.output_file_id, base .. ".output.jsonl") end
  if s.error_file_id then s.error = self:fetch(s, s.error_file_id, base .. ".errors.jsonl") end
  self:hook("after_download", s)
  local c = type(s.counts) == "table" and s.counts or {}
  local done, failed = tonumber(c.completed) or 0, tonumber(c.failed) or 0
  if done == 0 and failed > 0 then              -- every line failed: the account's fault?
    local code, message = first_error(s.error)
    if service.ACCOUNT[code] then
      -- nothing of it ran: created again from its file once the account is fixed
      s.step, s.batch_id, s.output, s.error, s.status, s.counts = "uploaded", nil, nil, nil, nil, nil
      self:save(s)
      self:stop_if_account_error(code, message, 400)
    end
  end
  s.step = "downloaded"
  self:save(s)
  -- every line of the shard counts, and every line that did not succeed
  -- fails: a batch that failed or expired whole counts none of them
  local lines = math.max(tonumber(s.lines) or 0, tonumber(c.total) or 0, done + failed)
  self.lines_done, self.lines_failed = self.lines_done + lines, self.lines_failed + lines - done
  local ratio = opts.max_failure_ratio
  if ratio and self.lines_done > 0 and self.lines_failed / self.lines_done > ratio then
    self:trip(errors.new({ kind = "invalid", code = "max_failure_ratio", param = "max_failure_ratio",
      message = ("pipeline stopped: %d of %d lines failed, more than max_failure_ratio %g"):format(
        self.lines_failed, self.lines_done, ratio) }))
  end
end

function Run:finish(s)
  local opts = self.opts
  -- the new shard and this one's end are saved together
  local again = opts.resubmit or (s.stuck and opts.stuck_action == "cancel_resubmit")
  local failed = type(s.counts) == "table" and tonumber(s.counts.failed) or 0
  local answered = type(s.counts) == "table" and tonumber(s.counts.completed) or 0
  -- what did not run (expired, cancelled), the lines that failed for a
  -- reason that may pass (429, 5xx: results.classify) and the answers
  -- that are not the JSON their request asked for (invalid_answer) run again
  if again and (PARTIAL[s.status] or failed > 0 or answered > 0) and s.round < (opts.max_rounds or 3) then
    local path = s.path:gsub("%.jsonl$", "") .. ".r" .. (s.round + 1) .. ".jsonl"
    local r = try(results.open({ output = s.output, errors = s.error, inputs = s.path }))
    local n = try(r:resubmit(path, { classes = { "retryable", "invalid_answer" } }))
    if n == 0 then os.remove(path) end
    if n > 0 then
      local k = #self.state.shards + 1
      self.state.shards[k] = { k = k, path = path, name = self.state.run .. "-" .. k .. ".jsonl", lines = n,
        model = s.model, endpoint = s.endpoint, round = s.round + 1, step = "written", origin = s.origin or s.path }
      self.queue[#self.queue + 1] = self.state.shards[k]
      self:save(self.state.shards[k])
    end
  end
  s.step = "done"
  self:save(s)
  self:progress()
end

local STEPS = { written = "upload", uploading = "upload", uploaded = "create", creating = "create",
                created = "await", finished = "download", downloaded = "finish" }

-- a shard through its steps, each saved as it is reached
function Run:process(s)
  while s.step ~= "done" do
    local step = STEPS[s.step]
    if not step then throw(fail(("%s is in an unknown step %s"):format(s.name, tostring(s.step)))) end
    self[step](self, s)
  end
end

-- ------------------------------------------------------------ run

-- what a worker raised, as an error object
local function as_error(e)
  e = errors.thrown(e) or e
  if errors.is(e) then return e end
  return errors.new({ kind = "task", code = "pipeline_failed", message = tostring(e),
                      traceback = debug.traceback(tostring(e), 2) })
end

-- The run's client: `opts.client`, or one made from the options a
-- client takes for where it talks (provider, region, base_url, api_key),
-- as `lbatch.new` makes it; the report holds it (`report.client`).
local WHERE = { "provider", "region", "base_url", "api_key" }
local function client_of(fn, opts)
  local o = {}
  for _, k in ipairs(WHERE) do
    if opts[k] ~= nil and opts.client ~= nil then errors.arg(fn, ("opts.client or opts.%s, not both"):format(k)) end
    o[k] = opts[k]
  end
  if opts.client == nil then return require("lbatch.impl.api.client").new(o) end
  errors.check(fn, "opts.client", opts.client, "table")
  return opts.client
end

-- One owner per work directory (lbatch.lock): another run, flow or adopt
-- on it fails at once, or waits opts.wait_lock seconds for it.
local function lock_dir(opts, client)
  return lock.acquire(opts.dir, { wait = opts.wait_lock, sleep = function(s) client:sleep(s) end })
end

local run_locked, adopt_locked

-- A new run: the input sharded (into the run's own directory when another
-- run was there before), its fingerprint made, its shards in the journal.
local function first_run(ctx, log, state)
  local opts, client = ctx.opts, ctx.client
  local files = state and state.files or ctx.sub
  if type(opts.requests) == "string" then
    local fits, ferr = room(opts, opts.dir, size_of(opts.requests), 1)
    if not fits then return nil, ferr end
  end
  state = { version = 1, run = state and state.run or ctx.tok, phase = "sharding", files = files, shards = {} }
  local ok, err = log:compact(snapshot(state), pauser(client))
  if not ok then return nil, err end
  client:pause()
  local manifest = opts.manifest
  if not manifest then
    if files then
      local made, why = core.mkdir(files)
      if not made then return nil, errors.io("cannot make", files, why) end
    end
    manifest, err = shard(opts, files or opts.dir, client)
    if not manifest then return nil, err end
    client:pause()                       -- (the writer closed every shard file)
  end
  local input, n = input_hash(paths_of(manifest), pauser(client))
  if not input then return nil, n end
  ctx.fp.input, ctx.fp.requests = input, n
  state.fp = ctx.fp
  local cut_ok, cut, canary = pcall(with_canary, opts, client, manifest, n, files or opts.dir, opts.manifest)
  if not cut_ok then return nil, as_error(cut) end
  manifest, state.canary = cut or manifest, canary
  for i, f in ipairs(manifest.files) do
    state.shards[i] = { k = i, path = f.path, name = state.run .. "-" .. i .. ".jsonl", lines = f.lines,
      model = f.model, endpoint = f.endpoint, round = 1, step = "written", canary = f.canary }
    if i % 16 == 0 then client:pause() end
  end
  state.phase = "running"
  client:pause()
  return state
end

-- the report's counts: requests (of the input; nil when the journal does
-- not know them), reused (answered by a run before), sent (sent by this
-- run); change (what a rerun found)
local function counts(report, state, change, was_done)
  local sent = 0
  for _, s in ipairs(state.shards) do if s.round == 1 then sent = sent + (s.lines or 0) end end
  local reused = state.change and state.change.reused or 0
  if was_done and change.rerun and not change.archived and not change.fresh then reused, sent = reused + sent, 0 end
  report.requests = state.fp and state.fp.requests and math.floor(state.fp.requests) or nil
  report.reused, report.sent, report.change = math.floor(reused), math.floor(sent), change
end

--- Run a whole job: shard, upload, create, wait, download, merge.
-- Killed at any moment and run again on the same `dir`, it resumes from
-- its journal: nothing is uploaded or created twice.
-- @tparam table opts client, or what a client is made from here as
-- `lbatch.new` makes it: provider (`"groq"`, ...), region, base_url,
-- api_key; requests (a .jsonl or .csv path, a list of
-- requests, or an iterator returning them; a request is `{custom_id, body[,
-- url]}` or a whole line) or manifest (files already sharded, as
-- `jsonl.writer`'s close returns: sent as they are, each one a shard),
-- dir (locked for the run: another run, flow or adopt on it fails at once
-- with a `busy` error, code `dir_locked`, naming its holder; wait_lock =
-- seconds waits that long for it), journal (default dir/journal.jsonl),
-- model, endpoint, system, header (a CSV's first row: true a header, false a
-- request, nil a header when it looks like one), limits (a profile name, as in `jsonl.writer`;
-- default the client's: its provider's or region's),
-- max_lines, max_bytes, max_in_flight (8),
-- completion_window, metadata (a table, or fn(shard) -> table),
-- poll_interval, max_poll_interval, poll_factor, resubmit, max_rounds,
-- recover_window (45 s: how long an upload or a create in flight when
-- an earlier run died is looked for, by its stamps, before it is sent
-- again; a service may make it a while after it was asked),
-- disk_factor (3: answers up to 3x the requests' size; the free space is
-- checked first, `check_disk = false` to skip),
-- on_progress(p), on_step(step, shard), on_transfer(shard_name,
-- "up" | "down", bytes, total);
-- quotas: max_enqueued_tokens, max_enqueued_requests (a number, or
-- `{[model] = n}`; also learned from a `token_limit_exceeded` message): a
-- shard is created only when its model's work in flight leaves room, and
-- one refused by a quota is created again from the same file once work
-- of its model ends (`on_step("quota_delay", shard)`, `shard.delays`;
-- quota_backoff 1 s doubling to quota_backoff_max 60 s, max_quota_delays 100);
-- quota (an `lbatch.quota` object shared by runs at once: one account's
-- work in flight, and the limits learned, counted once; it replaces the two);
-- max_cost with prices (and discount, as `lbatch.estimate`): the run is
-- refused before any upload when its bound passes max_cost, and stopped
-- before a shard that would pass it (a resubmitted round counted on top
-- of what was committed); max_failure_ratio: stop once more than that
-- share of the finished shards' lines did not succeed (every line of a
-- shard counts: a batch that failed or expired whole, all of them); stuck_after (seconds),
-- on_stuck(batch, seconds), stuck_action = "cancel_resubmit" (cancel a
-- stuck batch and run its unfinished requests again).
-- An account that cannot work (arrears, no quota, a refused key:
-- `lbatch.service.ACCOUNT`) stops new submissions at once: `run` returns
-- nil and the service's code, and the journal resumes once it is fixed.
-- Every batch carries `metadata.lbatch_run` and `lbatch_shard` (and, on
-- DashScope, `ds_name`) beside the given metadata.
-- notify = {url, secret (or secrets), listen, adapter}: told, not
-- polling. The waits expect notices (`client:expect_notices`: polling at
-- the wait's interval is the fallback for one lost) and every notice
-- handed to `client:notice` wakes the wait on its batch; on DashScope
-- each batch names `url` as its `ds_batch_finish_callback` (OpenAI sends
-- its webhooks to the URL of the project's settings). With listen
-- (`"HOST:PORT"`) the run listens there itself, on `adapter.serve`
-- (default `lbatch.lua_http`: lua-http on cqueues), verifying signed
-- webhooks with the secrets.
-- A run knows what it was asked: its journal holds the options that shape
-- a request (model, system, endpoint, limits, header) or its batches
-- (max_lines, max_bytes, completion_window, metadata) and a hash of every
-- request line. Run again on the same `dir` with the same input, it
-- resumes (or, done, gives its results again). With an input that changed
-- (the old run done), it sends only the requests that are new or whose line
-- changed, keeps the answers of the others, and its results are exactly the
-- new input's requests, in its order (those no longer asked are dropped).
-- A changed option that shapes requests stops it with `run_changed`
-- (kind `invalid`) naming the difference, unless `on_change` says:
-- `"fresh"` (a new run in `dir`; the old journal is kept as
-- `journal-RUN.jsonl`, its files stay) or `"reuse"` (keep the answers whose
-- request line is unchanged: with another model or system prompt, none).
-- A journal of an older lbatch (no fingerprint) resumes unchecked:
-- `report.change.fingerprint` is `"unknown"`.
-- canary = {lines = N, check = fn(record) -> ok, why, min_ok = 0.95}: N
-- requests spread evenly over the input (lines floor(j * n / N): the same
-- ones on every run) are cut into shards of their own (the first) and run
-- first; each answer is judged: its status, its `class` when the reader
-- gives one, then `check` (an error in it is a failure, with the error).
-- The other requests are sent only when the share that passes is at least
-- min_ok; else the run returns nil and an error of kind `"canary"`, code
-- `canary_failed`, whose message names the share, min_ok and the first
-- failures, and `err.canary` the verdict `{state, requests, answered,
-- passed, share, min_ok, rest (the requests held), failures = {{custom_id,
-- why}, ...} (the first 20)}`: nothing more is uploaded. The verdict is in
-- the journal: a kill -9 during the canary resumes it, a run after it
-- passed does not run it again, and a run after it failed judges its
-- answers again (nothing sent; another check or min_ok may pass them).
-- `on_step("canary", verdict)` once judged. The canary counts in max_cost,
-- and its answers are in the results at their requests' places: the
-- results come in the input's order, as without a canary (`groups`: the
-- canary's shards first). A run started without a canary cannot take one
-- (`canary_late`); one judged by a check needs it again to resume
-- (`canary_check_missing`). Until the run is done its canary is the one
-- cut: another `lines` is refused (`canary_changed`, kind `"invalid"`;
-- the same number or none goes on with it, on_change = "fresh" starts a
-- new run), while a new `min_ok` is taken: a bar lowered after a failed
-- canary judges its answers again against it.
-- via = "batch_chat" (default "file"): each request sent as a held call of
-- DashScope's Batch Chat (Beijing), at half the real-time price, answers
-- appended to dir/batch-chat/results.jsonl as they come, a run again
-- sending only the requests without one; batch_chat_url (default the
-- provider's), concurrency (100 calls at once), wait (60 to 3,600 s the
-- service holds a call; default its own, 3,600), on_request(p), on_job(job)
-- (`job:cancel(custom_id)`); its report adds answered, unanswered,
-- cancelled and complete (see `lbatch.impl.orchestration.batchchat`).
-- @treturn table the report `{shards, results (a reader), outputs,
-- errors, inputs, journal, client, groups, placed, requests, reused, sent,
-- change}` (results: the records in the input's order; groups: each
-- first-round shard's `{inputs, output, errors}`, as `results.open` takes
-- them; a rerun's: one, its whole input; placed: where a canary's records
-- go among the others, nil without one. **To open the results again in
-- the input's order, pass `results.open{groups = report.groups, placed =
-- report.placed}`**: `inputs` lists the first-round shards' files, the
-- canary's first, so `results.open{inputs = report.inputs, outputs =
-- report.outputs, errors = report.errors}` joins every answer right but
-- gives a canary run's canary answers first; requests:
-- the input's count; reused: answered by a run before; sent: sent by this
-- run; change: what a rerun found: added, changed, dropped, reused,
-- shaping and notes (the differences, as text), archived (the old
-- journal's copy), fresh, fingerprint; canary: its verdict, as above), or
-- nil and an error
function M.run(opts)
  errors.check("pipeline.run", "opts", opts, "table")
  errors.check("pipeline.run", "opts.dir", opts.dir, "string")
  if opts.on_change ~= nil and opts.on_change ~= "fresh" and opts.on_change ~= "reuse" then
    errors.arg("pipeline.run", 'opts.on_change must be "fresh" or "reuse"')
  end
  check_canary(opts.canary)
  local client, cerr0 = client_of("pipeline.run", opts)
  if not client then return nil, cerr0 end
  -- via = "batch_chat": DashScope's Batch Chat, each request a held call (lbatch.impl.orchestration.batchchat)
  if opts.via ~= nil and opts.via ~= "file" then
    return require("lbatch.impl.orchestration.batchchat").pipeline(opts, client, { shard = shard, lock = lock_dir })
  end
  local n = opts.notify
  if n ~= nil then
    errors.check("pipeline.run", "opts.notify", n, "table")
    errors.check("pipeline.run", "opts.notify.url", n.url, "string", true)
    if n.url and not n.url:find("^https?://[^/]") then
      return nil, fail(("notify.url must be an http(s) URL, not %s"):format(n.url))
    end
    client:expect_notices()
    if n.listen then
      local listen = { client = client, listen = n.listen, secrets = n.secrets or { n.secret },
                       tolerance = n.tolerance, on_listen = n.on_listen, on_notice = n.on_notice,
                       on_refused = n.on_refused }
      local o = {}
      for k, v in pairs(opts) do o[k] = v end
      for _, k in ipairs(WHERE) do o[k] = nil end
      o.client = client
      o.notify = { url = n.url }
      return (n.adapter or require("lbatch.lua_http")).serve(listen, M.run, o)
    end
  end
  local made, why = core.mkdir(opts.dir)
  if not made then return nil, errors.io("cannot make", opts.dir, why:gsub("^mkdir [^:]*: ", "")) end
  local lk, lerr = lock_dir(opts, client)
  if not lk then return nil, lerr end
  return lk:release(run_locked(opts, client))
end

-- the run's journal opened and its state brought up to this run's input and
-- options (a first run shards, a rerun compares): log, state, change,
-- was_done; or nil and an error
local function open_state(opts, client, path)
  local log, jerr, state = open_journal(path)
  if not log then return nil, jerr end
  local ierr = check_identity(opts, path, state)
  if ierr then log:close() return nil, ierr end
  client:pause()
  local ctx, change = { opts = opts, client = client, tok = token() }, { notes = {} }
  ctx.fp = { options = options_fp(opts, client), source = source_hash(opts, pauser(client)) }
  if state and state.phase ~= "sharding" then
    ctx.sub = opts.dir .. "/" .. ctx.tok       -- a new run's files, beside the old run's
    local rerr
    state, change, rerr = rerun(ctx, state, path)
    if rerr then log:close() return nil, rerr end
  end
  if not state or state.phase == "sharding" then
    local err
    state, err = first_run(ctx, log, state)
    if not state then log:close() return nil, err end
  end
  local was_done = state.phase == "done"
  local pause = pauser(client)
  pause()
  local ok, cerr = log:compact(snapshot(state), pause)
  pause()                                -- (each of these syncs a file: a host's frame apiece)
  local known = ok and read_identity(opts.dir)      -- (a fresh run after another: its own id)
  if ok and (not known or known.run ~= state.run) then ok, cerr = write_identity(opts.dir, state.run) end
  if not ok then log:close() return nil, cerr end
  client:pause()
  return log, state, change, was_done
end

-- room on the disk for the answers still to come (what a killed run's
-- downloads left removed first): true, or nil and an error
local function make_room(opts, client, state)
  local pending, parts = 0, {}           -- the requests whose answers are still to come
  for i, s in ipairs(state.shards) do
    if s.step ~= "downloaded" and s.step ~= "done" then pending = pending + size_of(s.path) end
    local d = s.path:match("^(.*)/[^/]*$") or "."
    if not parts[d] then parts[d] = true core.remove_parts(d) end   -- what a killed run's downloads left
    -- a host's frame stays short: every file costs an open, and a new
    -- directory a read of it (pause itself is a clock read)
    if i % 4 == 0 then client:pause() end
  end
  return room(opts, opts.dir, pending, 0)
end

-- the cost cap, before anything is uploaded: every shard's bound (input
-- tokens and max_tokens at the prices), what was created counted as spent;
-- true, or nil and an error
local function check_cost(run, opts, state)
  if not opts.max_cost or state.phase == "done" then return true end
  local total = 0
  run.charged = {}
  local okc, cerr = pcall(function()
    for i, s in ipairs(state.shards) do
      run:estimate(s)
      total = total + s.cost_max
      if s.batch_id or s.step == "creating" then
        run.committed, run.charged[s] = run.committed + s.cost_max, true
      end
      if i % 16 == 0 then run.client:pause() end
    end
  end)
  if not okc then return nil, as_error(cerr) end
  if total > opts.max_cost then
    return nil, errors.new({ kind = "invalid", code = "max_cost", param = "max_cost", message = ("pipeline: "
      .. "the run may cost up to %.4g (input tokens and max_tokens at the prices), past max_cost %.4g; "
      .. "nothing was sent"):format(total, opts.max_cost) })
  end
  return true
end

-- the Run of this state, its shards numbered and the cost cap checked; or
-- nil and an error
local function new_run(opts, client, path, state, log)
  local ok, err = make_room(opts, client, state)
  if not ok then return nil, err end
  local run = setmetatable({ client = client, opts = opts, journal = path, state = state,
                             queue = {}, started = os.time(), dirty = {}, log = log,
                             quota = opts.quota or quota.new({ tokens = opts.max_enqueued_tokens,
                                                               requests = opts.max_enqueued_requests }),
                             admitted = {}, committed = 0, lines_done = 0, lines_failed = 0, workers = {},
                             quota_poll = opts.quota_poll or 0.2, dialect = client.dialect }, Run)
  for i, s in ipairs(state.shards) do s.k = s.k or i end
  client:pause()
  ok, err = check_cost(run, opts, state)
  if not ok then return nil, err end
  return run
end

-- every shard not done, by max_in_flight workers (a worker takes the next
-- shard; idle, it waits while a shard in progress may still add a
-- resubmitted one), then the phase "done" journaled: true, or nil and an error
-- (`only(shard)`: those shards only, the phase left as it is: the canary)
-- A worker (shared: the workers' first failure and how many are busy).
-- The module's function, not a closure per run: LuaJIT's traces of the
-- code that calls a closure hold to that one closure, and every new run
-- would have them compiled again.
local function work(run, shared)
  while not shared.failure and not run.tripped do
    local s = table.remove(run.queue, 1)
    if s then
      shared.busy = shared.busy + 1
      local done, err = pcall(run.process, run, s)
      shared.busy = shared.busy - 1
      if not done then shared.failure = shared.failure or as_error(err) end
    elseif shared.busy == 0 then
      return
    else
      run.client:sleep(0.05)
    end
  end
end

local function submit_all(run, only)
  local client, shared = run.client, { busy = 0 }
  for _, s in ipairs(run.state.shards) do
    if s.step ~= "done" and (not only or only(s)) then run.queue[#run.queue + 1] = s end
  end
  local workers = run.workers
  for i = 1, math.max(1, run.opts.max_in_flight or 8) do
    workers[i] = client:spawn(work, run, shared)
    client:pause()
  end
  local failure
  for _, w in ipairs(workers) do
    local _, err = w:join()
    failure = shared.failure or failure or err
  end
  run:flush()
  failure = run.tripped or failure or run.failure
  if failure then return nil, failure end
  if only then return true end
  run.state.phase = "done"
  return run.log:append({ phase = "done" })
end

-- ------------------------------------------------------------ the canary's verdict

local KEPT_FAILURES, SHOWN_FAILURES = 20, 3

-- the shards of the canary: its own and their resubmissions
local function canary_set(state)
  local paths = {}
  for _, s in ipairs(state.shards) do if s.canary then paths[s.path] = true end end
  return function(s) return paths[s.origin or s.path] == true end
end

-- the canary's requests with their answers, as results.open takes them
-- (later rounds first: their answers are newer)
local function canary_group(state)
  local g, in_it = { inputs = {}, output = {}, errors = {} }, canary_set(state)
  for _, s in ipairs(state.shards) do if s.canary then g.inputs[#g.inputs + 1] = s.path end end
  for i = #state.shards, 1, -1 do
    local s = state.shards[i]
    if in_it(s) and s.output then g.output[#g.output + 1] = s.output end
    if in_it(s) and s.error then g.errors[#g.errors + 1] = s.error end
  end
  return g
end

-- why a canary's record fails, or nil when it passes: its status, its
-- class (a reader's shape check), then the user's check
local function canary_verdict(rec, check)
  if rec.missing then return "no answer" end
  if not rec.ok then
    return ("%s: %s"):format(tostring(rec.error_code or rec.class or "failed"), tostring(rec.error_message or "not ok"))
  end
  if rec.class ~= nil and rec.class ~= "ok" then return "its answer is of class " .. tostring(rec.class) end
  if not check then return nil end
  local ran, good, why = pcall(check, rec)
  if not ran then return "the check raised an error: " .. tostring(errors.thrown(good) or good) end
  if not good then return why ~= nil and tostring(why) or "the check said no" end
end

-- the canary's answers judged: {requests, answered, passed, failures}; throws
local function judge_canary(run, check)
  local client = run.client
  local reader = try(results.open({ groups = { canary_group(run.state) }, pause = function() client:pause() end }))
  local v = { requests = 0, answered = 0, passed = 0, failures = {} }
  for rec, err in reader:each() do
    if not rec then throw(err) end
    v.requests = v.requests + 1
    if not rec.missing then v.answered = v.answered + 1 end
    local why = canary_verdict(rec, check)
    if why == nil then v.passed = v.passed + 1
    elseif #v.failures < KEPT_FAILURES then v.failures[#v.failures + 1] = { custom_id = rec.custom_id, why = why } end
  end
  return v
end

local function percent(x) return ("%d%%"):format(math.floor(x * 100 + 0.5)) end

local function canary_failed(c, opts)
  local first = {}
  for i = 1, math.min(SHOWN_FAILURES, #c.failures) do
    first[i] = ("%s: %s"):format(tostring(c.failures[i].custom_id), c.failures[i].why)
  end
  return errors.new({ kind = "canary", code = "canary_failed", param = "canary", canary = c, message = ("pipeline: "
    .. "the canary failed: %d of its %d requests passed (%s), under min_ok %s; the other %d requests were not "
    .. "sent. First failures: %s. Its answers stay in %s: run again with a fixed check or another min_ok to judge "
    .. "them again (nothing is sent twice), or with a fixed prompt as a new run (--fresh, on_change = \"fresh\")")
    :format(c.passed, c.requests, percent(c.share), percent(c.min_ok), c.rest or 0,
      #first > 0 and table.concat(first, "; ") or "none", opts.dir) })
end

-- canary.lines asked anew on a run whose canary is cut already
local function canary_changed(dir, lines, asked)
  return errors.new({ kind = "invalid", code = "canary_changed", param = "canary", message = ("pipeline: %s holds "
    .. "a run whose canary is %d requests; %d were asked now, and a canary once cut is not cut again: to go on "
    .. "with the journal's, give the same number (canary.lines = %d, --canary %d) or none; to have %d, start a new "
    .. "run (--fresh, on_change = \"fresh\", or another dir); nothing was sent"):format(dir, lines, asked, lines,
    lines, asked) })
end

-- nil when the canary can be judged with these options, else the error
local function canary_refused(state, opts)
  local c = state.canary
  if not c and opts.canary then
    return errors.new({ kind = "invalid", code = "canary_late", param = "canary", message = ("pipeline: %s holds "
      .. "a run started without a canary, its shards already cut: run it again without one to finish it, or "
      .. "start a new run with one (--fresh, on_change = \"fresh\")"):format(opts.dir) })
  end
  if c and (tonumber(c.version) or math.huge) > CANARY_VERSION then
    return errors.new({ kind = "invalid", code = "journal_newer", param = "canary", message = ("pipeline: %s's "
      .. "canary is of version %s; this lbatch reads version %d: run it with the lbatch that wrote it")
      :format(opts.dir, tostring(c.version), CANARY_VERSION) })
  end
  if c and opts.canary then
    local asked, lines = opts.canary.lines, tonumber(c.lines) or 0
    if math.min(asked, lines + (tonumber(c.rest) or 0)) ~= lines then return canary_changed(opts.dir, lines, asked) end
  end
  if c and c.state ~= "passed" and c.has_check and not (opts.canary and opts.canary.check) then
    return errors.new({ kind = "invalid", code = "canary_check_missing", param = "canary", message = ("pipeline: "
      .. "%s's canary has not passed yet and was to be judged by a check: give it again (canary = {check = ...}, "
      .. "--canary-check FILE.lua); nothing was sent"):format(opts.dir) })
  end
end

-- The canary first: its shards through their steps (resumed after a
-- kill), its answers judged, the verdict in the journal. True when the
-- rest may go; nil and an error (kind "canary") when it failed.
local function canary_gate(run)
  local state, opts = run.state, run.opts
  local c = state.canary
  if not c or c.state == "passed" then return true end
  local ok, err = submit_all(run, canary_set(state))
  if not ok then return nil, err end
  local check = opts.canary and opts.canary.check
  local judged, v = pcall(judge_canary, run, check)
  if not judged then return nil, as_error(v) end
  c.min_ok = opts.canary and opts.canary.min_ok or c.min_ok
  c.requests, c.answered, c.passed, c.failures = v.requests, v.answered, v.passed, v.failures
  c.share = v.passed / math.max(v.requests, 1)
  c.state = c.share >= c.min_ok and "passed" or "failed"
  local saved, serr = run.log:compact(snapshot(state))
  if not saved then return nil, serr end
  run:hook("canary", c)
  if c.state == "passed" then return true end
  return nil, canary_failed(c, opts)
end

-- where the canary's answers go among the others in the results: at the
-- lines it was cut from, so that they come in the input's order (a first
-- run's groups are its shards, the canary's first; a rerun's group is its
-- whole input, in order already); nil without a canary
local function canary_placed(state)
  local c = state.canary
  if not c or state.view then return nil end
  local m, want = 0, tonumber(c.lines) or 0
  for _, s in ipairs(state.shards) do if s.round == 1 and s.canary then m = m + 1 end end
  local n = want + (tonumber(c.rest) or 0)
  if m == 0 or want == 0 then return nil end
  return { groups = m, at = function(j) return j <= want and canary_pick(j - 1, n, want) + 1 or nil end }
end

-- the report: each first-round shard is joined with its own answers and
-- those of its resubmissions, so the merge holds one shard's index at a
-- time, whatever the total (a rerun: its input with the answers sent and kept)
local function collect(client, path, state, change, was_done)
  local outputs, errs, groups = {}, {}, groups_of(state)
  for _, s in ipairs(state.shards) do
    if s.output then outputs[#outputs + 1] = s.output end
    if s.error then errs[#errs + 1] = s.error end
  end
  client:pause()
  local placed = canary_placed(state)
  local reader, rerr = results.open({ groups = groups, placed = placed, pause = pauser(client) })
  if not reader then return nil, rerr end
  local report = { shards = state.shards, outputs = outputs, errors = errs, inputs = view_of(state), journal = path,
                   results = reader, client = client, groups = groups, placed = placed }
  counts(report, state, change, was_done)
  return report
end

-- the run, its directory locked: the state, the Run, the shards submitted
-- and collected, the report
function run_locked(opts, client)
  local path = opts.journal or (opts.dir .. "/journal.jsonl")
  local log, state, change, was_done = open_state(opts, client, path)
  if not log then return nil, state end
  local run, err = new_run(opts, client, path, state, log)
  if run and state.phase ~= "done" then err = canary_refused(state, opts) run = not err and run end
  if not run then log:close() return nil, err end
  local unhook = client:at_turn_end(function() run:flush() end)
  local done, ferr = true, nil
  if state.phase ~= "done" then
    done, ferr = canary_gate(run)
    if done then done, ferr = submit_all(run) end
  end
  unhook()
  log:close()
  if not done then return nil, ferr end
  client:pause()
  local report, rerr = collect(client, path, state, change, was_done)
  if report then report.canary = state.canary end
  return report, rerr
end

-- the canary marks of a run's batches: {lines = the canary's size, [k] =
-- true for each shard marked}, or nil when none is
local function canary_marks(batches)
  local marks
  for k, b in pairs(batches) do
    local n = type(b.metadata) == "table" and tonumber(b.metadata.lbatch_canary)
    if n then
      marks = marks or {}
      marks[k], marks.lines = true, n
    end
  end
  return marks
end

-- the account's files and batches of run `run`, by shard number: files,
-- batches, the canary's marks; or nil and an error
local function run_items(client, run)
  local name_pattern = "^" .. run:gsub("%p", "%%%0") .. "%-(%d+)%.jsonl$"
  local files, batches = {}, {}
  for f, ferr in client:each_file({ limit = 100 }) do
    if not f then return nil, ferr end
    local k = type(f.filename) == "string" and tonumber(f.filename:match(name_pattern))
    if k and (not files[k] or (f.created_at or 0) > (files[k].created_at or 0)) then files[k] = f end
  end
  for b, berr in client:each_batch({ limit = 100 }) do
    if not b then return nil, berr end
    local m = type(b.metadata) == "table" and b.metadata or {}
    local k = m.lbatch_run == run and tonumber(m.lbatch_shard)
    local refused = b.status == "failed" and type(b.errors) == "table" and type(b.errors.data) == "table"
      and type(b.errors.data[1]) == "table" and quota.refused(b.errors.data[1].code)
    if k and not refused and (not batches[k] or (b.created_at or 0) > (batches[k].created_at or 0)) then
      batches[k] = b
    end
  end
  return files, batches, canary_marks(batches)
end

local function requests_of(b)
  local n = type(b) == "table" and type(b.request_counts) == "table" and tonumber(b.request_counts.total)
  return n and n > 0 and n or nil
end

-- how the run's shards differ from these (sizes, line counts, how many,
-- the window): a message and the option it names, or nil when they match
local function mismatch(manifest, files, batches, window)
  local most = 0
  for k in pairs(files) do most = math.max(most, k) end
  for k in pairs(batches) do most = math.max(most, k) end
  if most > #manifest.files then
    return ("the run has a shard %d, these requests make %d"):format(most, #manifest.files), "max_lines"
  end
  for k, f in ipairs(manifest.files) do
    local file, b, bytes = files[k], batches[k], size_of(f.path)
    if file and tonumber(file.bytes) and file.bytes ~= bytes then
      return ("the run's file %s holds %d bytes, shard %d here %d"):format(file.filename, file.bytes, k, bytes)
    end
    if requests_of(b) and requests_of(b) ~= f.lines then
      return ("the run's batch %s holds %d requests, shard %d here %d"):format(b.id, requests_of(b), k, f.lines),
        "max_lines"
    end
    if window and b and type(b.completion_window) == "string" and b.completion_window ~= window then
      return ("the run's batch %s has the window %s, not %s"):format(b.id, b.completion_window, window),
        "completion_window"
    end
  end
end

-- the lines of the run's first shard, by its batch's count or its file's
-- bytes (these requests, line after line, until they add up): n or nil
local function first_shard_lines(manifest, files, batches)
  if requests_of(batches[1]) then return requests_of(batches[1]) end
  local want = files[1] and tonumber(files[1].bytes)
  if not want then return nil end
  local sum, n = 0, 0
  for _, m in ipairs(manifest.files) do
    local fh = io.open(m.path, "rb")
    if not fh then return nil end
    for line in fh:lines() do
      sum, n = sum + #line + 1, n + 1
      if sum >= want then fh:close() return sum == want and n or nil end
    end
    fh:close()
  end
end

local function mismatch_error(run, why, param)
  return errors.new({ kind = "invalid", code = "adopt_mismatch", param = param, message = ("pipeline.adopt: "
    .. "run %s was not made with these requests and options: %s; nothing was adopted (give adopt the options "
    .. "the run had: max_lines, model, system, header, endpoint, limits, completion_window, canary)"):format(run,
    why) })
end

-- the requests as run took them: {manifest (cut for a canary, as run cut
-- it), input (its hash) and n (its count, before the cut), canary (its
-- state)}, or nil and an error
local function adopt_cut(opts, client, manifest)
  local input, n = input_hash(paths_of(manifest), function() client:pause() end)
  if not input then return nil, n end
  local ok, cut, canary = pcall(with_canary, opts, client, manifest, n, opts.dir, opts.manifest)
  if not ok then return nil, as_error(cut) end
  return { manifest = cut or manifest, input = input, n = n, canary = canary }
end

-- the shards of the run: its requests cut as adopt_cut says, which its
-- files and batches match (with max_lines read from them when it was not
-- given, and no canary), or nil and an error
local function run_shards(opts, client, files, batches)
  local manifest, err = opts.manifest, nil
  if not manifest then manifest, err = shard(opts, opts.dir, client) end
  if not manifest then return nil, err end
  local cut, cerr = adopt_cut(opts, client, manifest)
  if not cut then return nil, cerr end
  local why, param = mismatch(cut.manifest, files, batches, opts.completion_window)
  if not why then return cut end
  if opts.manifest or opts.canary then return nil, mismatch_error(opts.run, why, param) end   -- (cut as told)
  local n = param ~= "completion_window" and first_shard_lines(manifest, files, batches)
  if not n or opts.max_lines ~= nil then
    if n and n ~= opts.max_lines then why, param = why .. (" (its shards hold %d lines)"):format(n), "max_lines" end
    return nil, mismatch_error(opts.run, why, param)
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.max_lines = n
  manifest, err = shard(o, opts.dir, client)
  if not manifest then return nil, err end
  why, param = mismatch(manifest, files, batches, opts.completion_window)
  if why then return nil, mismatch_error(opts.run, why, param) end
  cut, cerr = adopt_cut(o, client, manifest)
  if not cut then return nil, cerr end
  return cut, n
end

-- a canary run's marks against the canary adopt was told (opts.canary,
-- cut into `cut`): nil when they agree, else the error
local function canary_adopt_refused(opts, marks, cut)
  if not marks then return nil end
  local run = opts.run
  if not opts.canary then
    return errors.new({ kind = "invalid", code = "adopt_canary", param = "canary", message = ("pipeline.adopt: run "
      .. "%s was cut for a canary of %d requests (its batches say so): adopt it with that canary (canary = {lines "
      .. "= %d}, --canary %d; and its check, --canary-check FILE.lua, if it had one); nothing was adopted")
      :format(run, marks.lines, marks.lines, marks.lines) })
  end
  local c = cut.canary
  local why = c and c.lines ~= marks.lines and ("its canary held %d requests, these make one of %d")
    :format(marks.lines, c.lines)
  for k in pairs(marks) do
    if not why and k ~= "lines" and not (cut.manifest.files[k] or {}).canary then
      why = ("its shard %d was of its canary, here it is not"):format(k)
    end
  end
  if why then return mismatch_error(run, why, "canary") end
end

-- the adopted canary: the run's rest sent (a file or a batch past the
-- canary's shards) means it had passed; else it is judged on the next run
local function adopted_canary(state, files, batches)
  local c = state.canary
  if not c then return end
  for k in pairs(files) do if state.shards[k] and not state.shards[k].canary then c.state = "passed" end end
  for k in pairs(batches) do if state.shards[k] and not state.shards[k].canary then c.state = "passed" end end
  c.adopted = true
end

--- Rebuild a lost journal from the account, so that `run` resumes the
-- run without paying twice. The requests are sharded again into `dir`
-- (the same requests and options make the same shards), and each shard is
-- matched to what the service holds: its file by the run's unique name,
-- its batch by `metadata.lbatch_run` and `lbatch_shard` (the newest, when
-- a quota made several). A shard with a batch resumes waiting (or
-- downloading), one with a file resumes creating, the rest are sent.
-- Resubmissions of an earlier round are not adopted: their round runs
-- again from the first round's results.
-- The shards must be the run's: the files' sizes, the batches' request
-- counts and the number of shards are checked (and the batches' window
-- against completion_window, when given). When max_lines was not given,
-- the run's is read from its first shard (`found.max_lines`); any other
-- difference is an `adopt_mismatch` error, and a run of which the account
-- holds no file and no batch is `run_not_found`: nothing is written.
-- A canary run (`run`'s canary) is adopted with `canary = {lines, check,
-- min_ok}` as it had: the requests are cut as it cut them (its canary's
-- shards first, checked too) and its canary is journaled as passed when
-- the account holds any of the rest (`found.canary`), else pending: the
-- next run judges it (with the check given then). Its batches are marked
-- (`metadata.lbatch_canary`, the canary's size, when the metadata has
-- room): one adopted without its canary, or another size, is refused
-- (`adopt_canary`, `adopt_mismatch`). max_lines is not read from a canary
-- run's shards: give it when the run had one.
-- @tparam table opts client (or provider, region, base_url, api_key, as
-- `run`), dir, run (the run's id: `metadata.lbatch_run`
-- of its batches, the prefix of its files' names), requests and the
-- sharding options `run` took (model, endpoint, system, header, limits,
-- max_lines, max_bytes), or manifest (the files `run` was handed, as it
-- took them: a flow's round), completion_window, journal, wait_lock (as
-- `run`'s: dir is locked)
-- @treturn table `{run, shards, files, batches, max_lines, canary}` (counts
-- found; max_lines when read from the run; the canary's state), or nil and an error
function M.adopt(opts)
  errors.check("pipeline.adopt", "opts", opts, "table")
  errors.check("pipeline.adopt", "opts.dir", opts.dir, "string")
  errors.check("pipeline.adopt", "opts.run", opts.run, "string")
  if not opts.run:find("^[%w_-]+$") then
    return nil, errors.new({ kind = "invalid", code = "invalid_run", param = "run",
      message = ("pipeline.adopt: %q is not a run id"):format(opts.run) })
  end
  check_canary(opts.canary)
  local client, why0 = client_of("pipeline.adopt", opts)
  if not client then return nil, why0 end
  local made, why = core.mkdir(opts.dir)
  if not made then return nil, errors.io("cannot make", opts.dir, why:gsub("^mkdir [^:]*: ", "")) end
  local lk, lerr = lock_dir(opts, client)
  if not lk then return nil, lerr end
  return lk:release(adopt_locked(opts, client))
end

-- the adoption, its directory locked
function adopt_locked(opts, client)
  local path = opts.journal or (opts.dir .. "/journal.jsonl")
  local old = io.open(path, "rb")
  if old then
    old:close()
    return nil, errors.new({ kind = "invalid", code = "journal_exists", param = "dir", message = ("pipeline.adopt: "
      .. "%s exists: adopt rebuilds a lost journal, it does not replace one"):format(path) })
  end
  local run = opts.run
  local files, batches, marks = run_items(client, run)
  if not files then return nil, batches end
  if marks and not opts.canary then return nil, canary_adopt_refused(opts, marks) end
  if not next(files) and not next(batches) then
    return nil, errors.new({ kind = "invalid", code = "run_not_found", param = "run", message = ("pipeline.adopt: "
      .. "the account holds no file (%s-N.jsonl) and no batch (metadata.lbatch_run) of run %s among its "
      .. "newest; nothing was adopted"):format(run, run) })
  end
  local cut, max_lines = run_shards(opts, client, files, batches)
  if not cut then return nil, max_lines end
  local refused = canary_adopt_refused(opts, marks, cut)
  if refused then return nil, refused end
  local manifest = cut.manifest
  local state = { version = 1, run = run, phase = "running", shards = {}, canary = cut.canary }
  local function pause() client:pause() end
  -- what the run was asked, as run records it (before a canary's cut)
  state.fp = { options = options_fp(opts, client), source = source_hash(opts, pause), input = cut.input,
               requests = cut.n }
  local found = { run = run, shards = #manifest.files, files = 0, batches = 0, max_lines = max_lines }
  for i, f in ipairs(manifest.files) do
    local s = { k = i, path = f.path, name = run .. "-" .. i .. ".jsonl", lines = f.lines, model = f.model,
                endpoint = f.endpoint, round = 1, step = "written", canary = f.canary }
    local b, file = batches[i], files[i]
    if b then
      s.step, s.batch_id, s.file_id, s.status = "created", b.id, b.input_file_id, b.status
      found.batches = found.batches + 1
    elseif file then
      s.step, s.file_id = "uploaded", file.id
    end
    if file then found.files = found.files + 1 end
    state.shards[i] = s
  end
  adopted_canary(state, files, batches)
  found.canary = state.canary and state.canary.state
  local log, jerr = open_journal(path)
  if not log then return nil, jerr end
  local ok, cerr = log:compact(snapshot(state))
  log:close()
  if not ok then return nil, cerr end
  return found
end

return M
