--- Enqueued-work quotas: what a pipeline may have in flight per model.
--
-- OpenAI (and Azure, per deployment) limit the tokens a model may have
-- enqueued across an organisation's batches, and for embeddings the
-- requests too. Past the limit `create` still answers 200 and the batch
-- then fails with `token_limit_exceeded` (Azure in some regions answers
-- 400 at create). A quota keeps, per model, the tokens and requests of the
-- batches in flight (from each shard's estimate) and admits a shard only
-- when it fits a limit that is configured (`max_enqueued_tokens`,
-- `max_enqueued_requests`: one number, or a table by model) or learned
-- from the service's message ("Limit: 2,000,000 enqueued tokens"). A shard
-- that fits no limit even alone is admitted when nothing of its model is
-- in flight (the service decides).
-- @module lbatch.impl.orchestration.quota
local M = {}

local Quota = {}
Quota.__index = Quota

local function per_model(v, model)
  if type(v) == "table" then return v[model] end
  return v
end

--- A quota.
-- @tparam[opt] table opts tokens (max_enqueued_tokens), requests
-- (max_enqueued_requests): a number, or `{[model] = number}`
-- @treturn table the quota
function M.new(opts)
  opts = opts or {}
  return setmetatable({ tokens = opts.tokens, requests = opts.requests, learned = {}, models = {} }, Quota)
end

--- A model's work in flight: `{tokens, requests, jobs, ended}`.
-- @tparam string name the model
-- @treturn table
function Quota:model(name)
  local m = self.models[name]
  if not m then
    m = { tokens = 0, requests = 0, jobs = 0, ended = 0 }
    self.models[name] = m
  end
  return m
end

--- The limits that hold for a model now: configured or learned, the lower.
-- @tparam string model
-- @treturn ?number tokens
-- @treturn ?number requests
function Quota:limits(model)
  local learned = self.learned[model] or {}
  local t, r = per_model(self.tokens, model), per_model(self.requests, model)
  if learned.tokens and (not t or learned.tokens < t) then t = learned.tokens end
  if learned.requests and (not r or learned.requests < r) then r = learned.requests end
  return t, r
end

--- Is any limit known for the model (so shards need an estimate)?
-- @tparam string model
-- @treturn boolean
function Quota:limited(model)
  local t, r = self:limits(model)
  return t ~= nil or r ~= nil
end

--- Does a shard of `tokens` and `requests` fit now?
-- @tparam string model
-- @tparam number tokens
-- @tparam number requests (counted against the request limit only for
-- `embeddings`)
-- @tparam[opt] boolean embeddings
-- @treturn boolean
function Quota:fits(model, tokens, requests, embeddings)
  local m = self:model(model)
  if m.jobs == 0 then return true end
  local t, r = self:limits(model)
  if t and m.tokens + (tokens or 0) > t then return false end
  if r and embeddings and m.requests + (requests or 0) > r then return false end
  return true
end

--- A shard's batch was created: its work is in flight.
function Quota:admit(model, tokens, requests, embeddings)
  local m = self:model(model)
  m.jobs, m.tokens = m.jobs + 1, m.tokens + (tokens or 0)
  if embeddings then m.requests = m.requests + (requests or 0) end
end

--- A shard's batch ended (or failed): its work is no longer in flight.
function Quota:release(model, tokens, requests, embeddings)
  local m = self:model(model)
  m.jobs, m.tokens = math.max(0, m.jobs - 1), math.max(0, m.tokens - (tokens or 0))
  if embeddings then m.requests = math.max(0, m.requests - (requests or 0)) end
  m.ended = m.ended + 1
end

--- How many batches of the model have ended: a shard refused by the
-- quota waits for this to move before it is created again.
-- @tparam string model
-- @treturn integer
function Quota:ended(model) return self:model(model).ended end

-- "2,000,000" -> 2000000
local function number(s) return tonumber((s:gsub("[,_ ]", ""))) end

--- Learn a limit from the service's message, e.g. "Enqueued token limit
-- reached for gpt-4o-mini in organization org-x. Limit: 2,000,000
-- enqueued tokens." (or "... enqueued requests").
-- @tparam string model
-- @tparam ?string message
-- @treturn boolean whether a limit was read
function Quota:learn(model, message)
  if type(message) ~= "string" then return false end
  local n, what = message:match("[Ll]imit:?%s*([%d,_ ]*%d)%s*enqueued%s+(%a+)")
  n = n and number(n)
  if not n then return false end
  local l = self.learned[model] or {}
  self.learned[model] = l
  if what:find("^token") then l.tokens = math.min(l.tokens or math.huge, n)
  elseif what:find("^request") then l.requests = math.min(l.requests or math.huge, n)
  else return false end
  return true
end

--- Is this failure a quota's (the batch or create may succeed later, once
-- work of its model ends)? `token_limit_exceeded` from a failed batch or a
-- create; a running-jobs cap (429 at create).
-- @tparam ?string code
-- @treturn boolean
function M.refused(code)
  if code == "token_limit_exceeded" or code == "too_many_running_batches" or code == "too_many_tasks"
     or code == "batch_limit_exceeded" then
    return true
  end
  return false
end

return M
