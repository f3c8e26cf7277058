-- Failure modes that users of batch APIs meet, each off until set: at start
-- by `emulator/run --mode NAME=JSON`, at runtime by POST /_emulator/modes
-- {NAME: {...} | false}. emulator/run's header describes each one; this
-- keeps them checked, answers GET /_emulator/modes, and counts their hits
-- (/_emulator/stats modes_hit).
local cjson = require "cjson"

local M = { on = {}, hits = {}, arrears_created = 0 }

local function num(v, lo) return type(v) == "number" and v == math.floor(v) and v >= (lo or 0) end
local function seconds(v) return type(v) == "number" and v >= 0 end
local function opt(v, check) return v == nil or check(v) end

-- name -> check(value): the value as kept, or nil and what is wrong
local CHECK = {
  token_limit = function(v)
    if not (opt(v.tokens, num) and opt(v.requests, num) and opt(v.fail_fast, function(x)
      return type(x) == "boolean" end)) or (v.tokens == nil and v.requests == nil) then
      return nil, "token_limit is {tokens = N, requests = M, fail_fast = bool} (tokens or requests)"
    end
    return { tokens = v.tokens, requests = v.requests, fail_fast = v.fail_fast == true }
  end,
  running_cap = function(v)
    if not num(v.jobs) then return nil, "running_cap is {jobs = N}" end
    return { jobs = v.jobs }
  end,
  arrears = function(v)
    if not opt(v.after, num) then return nil, "arrears is {after = K}" end
    return { after = v.after or 0 }
  end,
  empty_output = function() return true end,
  line_errors = function(v)
    local status = v.status or 500
    if (status ~= 500 and status ~= 429) or not num(v.every, 1) then
      return nil, "line_errors is {status = 500 | 429, every = N >= 1}"
    end
    return { status = status, every = v.every }
  end,
  consistency_delay = function(v)
    if not seconds(v.seconds) then return nil, "consistency_delay is {seconds = S}" end
    return { seconds = v.seconds }
  end,
  cut_download = function(v)
    if not num(v.bytes) then return nil, "cut_download is {bytes = B}" end
    return { bytes = v.bytes }
  end,
  slow_commit = function(v)
    if not seconds(v.seconds) then return nil, "slow_commit is {seconds = S}" end
    return { seconds = v.seconds }
  end,
  hold = function(v)
    if (v.status ~= "validating" and v.status ~= "finalizing") or not seconds(v.seconds) then
      return nil, "hold is {status = \"validating\" | \"finalizing\", seconds = S}"
    end
    return { status = v.status, seconds = v.seconds }
  end,
}

-- Apply {NAME: value | false}, all or nothing: true, or nil and a message.
function M.set(changes)
  if type(changes) ~= "table" then return nil, "modes are a JSON object {NAME: {...} | false}" end
  local new = {}
  for name, v in pairs(changes) do
    local check = CHECK[name]
    if not check then
      local names = {}
      for k in pairs(CHECK) do names[#names + 1] = k end
      table.sort(names)
      return nil, ("unknown mode %q (modes: %s)"):format(tostring(name), table.concat(names, ", "))
    end
    if v == false or v == cjson.null then new[name] = false
    elseif name == "empty_output" and v == true then new[name] = true
    elseif type(v) ~= "table" then return nil, name .. " is an object, or false to turn it off"
    else
      local kept, e = check(v)
      if kept == nil then return nil, e end
      new[name] = kept
    end
  end
  for name, v in pairs(new) do
    M.on[name] = v or nil
    if name == "arrears" then M.arrears_created = 0 end   -- K counts from when it is set
  end
  return true
end

-- the mode's settings when it is on, else nil
function M.get(name) return M.on[name] end

-- slow_commit: wait (real seconds) before an upload or a create is made,
-- as a slow store does; the client may have gone meanwhile, the object is
-- made all the same (nginx does not stop a handler whose client left)
function M.commit_delay()
  local s = M.on.slow_commit
  if s and s.seconds > 0 then
    M.hit("slow_commit")
    ngx.sleep(s.seconds)
  end
end

function M.hit(name, n) M.hits[name] = (M.hits[name] or 0) + (n or 1) end

-- a JSON file of modes (emulator/run's --mode flags), applied at start
function M.load(path)
  local fh = path and io.open(path, "rb")
  if not fh then return end
  local text = fh:read("*a")
  fh:close()
  if text == "" then return end
  local ok, obj = pcall(cjson.decode, text)
  if not ok then error("emulator: --mode: not JSON: " .. text) end
  local done, e = M.set(obj)
  if not done then error("emulator: --mode: " .. e) end
end

-- "2,000,000"
function M.commas(n)
  local s = tostring(math.floor(n))
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (out:gsub("^,", ""))
end

return M
