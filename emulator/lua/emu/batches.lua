-- The Batch API: create, retrieve, cancel and list.
local cjson = require "cjson"
local respond = require "emu.respond"
local guard = require "emu.guard"
local admin = require "emu.admin"
local store = require "emu.store"
local engine = require "emu.engine"
local util = require "emu.util"
local modes = require "emu.modes"

local B = {}
local cfg

local json, err = respond.json, respond.err

function B.init(config) cfg = config end

local function window_hours(w)
  if type(w) ~= "string" then return nil end
  local n, unit = w:match("^(%d+)([hd])$")
  n = tonumber(n)
  if not n then return nil end
  if cfg.dialect == "openai" and cfg.profile.max_window_hours == 24 then return w == "24h" and 24 or nil end
  local hours = unit == "d" and n * 24 or n
  if hours < cfg.profile.min_window_hours or hours > cfg.profile.max_window_hours then return nil end
  return hours
end

-- metadata: nil, or an object of at most 16 short strings; nil, error response when not
local function check_metadata(meta)
  if meta == nil or meta == cjson.null then return nil end
  if type(meta) ~= "table" then
    return nil, err(400, "invalid_metadata", "metadata must be an object of strings.", "metadata")
  end
  local n = 0
  for k, v in pairs(meta) do
    n = n + 1
    if type(k) ~= "string" or type(v) ~= "string" or #k > 64 or #v > 512 then
      return nil, err(400, "invalid_metadata",
        "metadata values must be strings (keys up to 64, values up to 512 characters).", "metadata")
    end
  end
  if n > 16 then return nil, err(400, "invalid_metadata", "metadata has at most 16 keys.", "metadata") end
  return meta
end

-- arrears in the openai dialect: create (and upload) refused, as OpenAI
-- answers an account without quota; nil when not in arrears
function B.insufficient_quota()
  local a = modes.get("arrears")
  if not a or cfg.dialect ~= "openai" or modes.arrears_created < a.after then return nil end
  modes.hit("arrears")
  return json(429, { error = { code = "insufficient_quota", type = "insufficient_quota", param = cjson.null,
    message = "You exceeded your current quota, please check your plan and billing details." } })
end

-- consistency_delay: when a file or batch made `at` (service clock) is not visible yet
local made = {}            -- file or batch id -> store.now() when made (this run)
function B.made(id) made[id] = store.now() end
local function not_yet(id)
  local d = modes.get("consistency_delay")
  if d and made[id] and store.now() < made[id] + engine.scaled(d.seconds) then
    modes.hit("consistency_delay")
    return true
  end
end

function B.create()
  local quota = B.insufficient_quota()
  if quota then return quota end
  local req, e = respond.read_json()
  if not req then return e end
  admin.note("body", req)
  local fid = req.input_file_id
  if type(fid) ~= "string" or fid == "" then
    return err(400, "missing_required_parameter", "input_file_id is required.", "input_file_id")
  end
  if type(req.endpoint) ~= "string" or not cfg.profile.endpoints[req.endpoint] then
    local list = {}
    for url in pairs(cfg.profile.endpoints) do list[#list + 1] = url end
    table.sort(list)
    return err(400, "invalid_endpoint", "endpoint must be one of " .. table.concat(list, ", ") .. ".", "endpoint")
  end
  if req.completion_window == nil then req.completion_window = require("emu.providers").default_window() end
  local hours = window_hours(req.completion_window)
  if not hours then
    return err(400, "invalid_completion_window", cfg.dialect == "openai" and cfg.profile.max_window_hours == 24
      and "completion_window must be \"24h\"."
      or "completion_window must be between 24h and 336h (e.g. \"24h\", \"72h\", \"14d\").", "completion_window")
  end
  local meta
  meta, e = check_metadata(req.metadata)
  if e then return e end
  -- openai npm 6.49.0 resources/batches.d.ts BatchCreateParams.OutputExpiresAfter:
  -- anchor created_at (the output file's), seconds 3600 to 2592000; kept for the output files
  local oe, output_ttl = req.output_expires_after, nil
  if oe ~= nil and oe ~= cjson.null then
    local s = type(oe) == "table" and tonumber(oe.seconds)
    if type(oe) ~= "table" or oe.anchor ~= "created_at" or not s or s < 3600 or s > 2592000 or s ~= math.floor(s) then
      return err(400, "invalid_output_expires_after", "output_expires_after needs anchor \"created_at\" "
        .. "and seconds between 3600 and 2592000.", "output_expires_after")
    end
    output_ttl = s
  end
  local f = store.files[fid]
  if not f or not_yet(fid) then
    return err(404, "file_not_found", ("No such file: %s"):format(fid), "input_file_id")
  end
  local purpose = require("emu.providers").purpose()
  if f.purpose ~= purpose then
    return err(422, "invalid_input_file", ("File %s has purpose %q, not %q."):format(fid, f.purpose, purpose),
      "input_file_id")
  end
  if f.status == "pending" then        -- Together's upload without its PUT
    return err(400, "file_not_uploaded", ("File %s has no bytes yet."):format(fid), "input_file_id")
  end
  local owner = guard.owner()
  -- the running cap: --rate-limits' (the profile's), or running_cap's own
  local capped = modes.get("running_cap")
  local cap = capped and capped.jobs or cfg.rate_limits and cfg.profile.running
  if cap and engine.running(owner) >= cap then
    if capped then modes.hit("running_cap") end
    return err(429, "too_many_running_batches",
      ("At most %d batches may be running at once."):format(cap), nil, { ["Retry-After"] = "60" })
  end
  local tally
  local lim = modes.get("token_limit")
  if lim and lim.fail_fast then      -- Azure's way: create refuses it
    tally = engine.tally(fid, req.endpoint)
    local over = engine.over_limit(req.endpoint, tally, nil)
    if over then
      modes.hit("token_limit")
      return err(400, "token_limit_exceeded", over, nil)
    end
  end
  modes.commit_delay()
  local now = store.now()
  local b = {
    id = "batch_" .. util.uuid(), object = "batch", endpoint = req.endpoint,
    input_file_id = fid, completion_window = req.completion_window, status = "validating",
    created_at = math.floor(now), expires_at = math.floor(now + hours * 3600),
    request_counts = { total = 0, completed = 0, failed = 0 }, metadata = meta,
    sim = { t_stage = now, t_expires = now + engine.scaled(hours * 3600), owner = owner, tally = tally,
            output_ttl = output_ttl },
  }
  -- modes that decide how it runs, as they are when it is created
  local arrears = modes.get("arrears")
  if arrears then
    if modes.arrears_created >= arrears.after then        -- dashscope: its lines fail
      b.sim.arrears = true
      modes.hit("arrears")
    end
    modes.arrears_created = modes.arrears_created + 1
  end
  b.sim.empty_output = modes.get("empty_output") and true or nil
  b.sim.line_errors = modes.get("line_errors")
  B.made(b.id)
  store.put_batch(b)
  engine.track(b)
  return json(200, util.public(b, engine))
end

local function find(id)
  local b = store.batches[id]
  if not b then return nil, err(404, "batch_not_found", ("No such batch: %s"):format(id), "batch_id") end
  return b
end

function B.get(id)
  if store.batches[id] and not_yet(id) then
    return err(404, "batch_not_found", ("No such batch: %s"):format(id), "batch_id")
  end
  local b, e = find(id)
  return e or json(200, util.public(b, engine))
end

function B.cancel(id)
  local b, e = find(id)
  if not b then return e end
  local s = b.status
  if s == "validating" or s == "in_progress" then
    engine.cancel(b)
  elseif s ~= "cancelling" then
    return err(409, "batch_not_cancellable",
      ("Cannot cancel a batch with status %q."):format(engine.visible_status(b)), "batch_id")
  end
  return json(200, util.public(b, engine))
end

local function set_of(v)
  if not v then return nil end
  local t = {}
  for s in tostring(v):gmatch("[^,%s]+") do t[s] = true end
  return t
end

function B.list(args)
  local limit, e = respond.int_arg(args, "limit", 20, 1, 100)
  if not limit then return e end
  local statuses, files = set_of(args.status), set_of(args.input_file_ids)
  local window, bad = util.list_window(args)
  if not window then return err(400, "invalid_parameter", bad .. " must be yyyyMMddHHmmss (UTC+8).", bad) end
  local after_t, before_t = window.create_after, window.create_before
  local name = args.ds_name and tostring(args.ds_name)
  local start = #store.batch_order
  if args.after then
    local pos = store.batch_pos[args.after]
    if not pos then return err(404, "batch_not_found", ("No such batch: %s"):format(args.after), "after") end
    start = pos - 1
  end
  local items, has_more = {}, false
  for i = start, 1, -1 do
    local b = store.batches[store.batch_order[i]]
    local meta = type(b.metadata) == "table" and b.metadata or {}
    if (not statuses or statuses[engine.visible_status(b)])
      and (not files or files[b.input_file_id])
      and (not after_t or b.created_at >= after_t)
      and (not before_t or b.created_at <= before_t)
      and (not name or (type(meta.ds_name) == "string" and meta.ds_name:find(name, 1, true))) then
      if #items == limit then has_more = true break end
      items[#items + 1] = util.public(b, engine)
    end
  end
  return respond.page(items, has_more, cfg.dialect == "dashscope")
end

return B
