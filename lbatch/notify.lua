--- Told, not polling: the receiving end of the service's notices.
--
--    local n = require("lbatch.notify").new{ secrets = { "whsec_..." } }
--    local notice, err = n:verify(headers, body)   -- one delivery
--    if notice then client:notice(notice) end      -- the wait wakes
--
-- OpenAI signs its webhooks by the Standard Webhooks scheme: headers
-- `webhook-id`, `webhook-timestamp` (Unix seconds) and `webhook-signature`
-- (`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, several separated by
-- spaces), keyed by the secret's base64 part after `whsec_`. `verify`
-- checks them with OpenSSL's HMAC and a constant-time comparison, against
-- every secret given (rotation), refuses a timestamp more than `tolerance`
-- seconds away, an id seen before (a bounded memory of ids), and a body
-- over `max_body` bytes.
--
-- DashScope's completion callback (`metadata.ds_batch_finish_callback`)
-- is not signed: a delivery with none of the three Standard Webhooks
-- headers is taken as one, unless `dashscope = false`, as a hint
-- (`signed = false`); a delivery with some of them and no
-- `webhook-signature` is refused (`webhook_headers`), as the standard
-- says. Every notice, signed or not, is only a hint: the
-- watcher fetches the batch from the service before anything acts on it,
-- so a forged `completed` changes nothing.
-- @module lbatch.notify
local core = require "lbatch.core"
local errors = require "lbatch.impl.transport.errors"
local json = require "lbatch.json"

local M = {}
local Notify = {}
Notify.__index = Notify

local PREFIX = "whsec_"
local MAX_BODY = 1024 * 1024      -- bytes: a batch event is a few hundred
local REMEMBER = 10000            -- webhook ids kept against replays

--- The OpenAI event types about batches (a set).
M.TYPES = { ["batch.completed"] = true, ["batch.failed"] = true,
            ["batch.expired"] = true, ["batch.cancelled"] = true }

local function refuse(code, message)
  return nil, errors.new({ kind = "invalid", code = code, message = message })
end

--- A secret's key bytes: the base64 after `whsec_` decoded (a secret
-- without the prefix is taken as base64 too, as Standard Webhooks does).
-- @tparam string secret
-- @treturn ?string the key, or nil when it is not base64
function M.key(secret)
  if type(secret) ~= "string" then return nil end
  if secret:sub(1, #PREFIX) == PREFIX then secret = secret:sub(#PREFIX + 1) end
  local k = core.unbase64(secret)
  if not k or k == "" then return nil end
  return k
end

--- The signature of one delivery, as a sender puts it in
-- `webhook-signature` (the emulator and the specs sign so).
-- @tparam string secret `whsec_...`
-- @tparam string id the webhook id
-- @tparam number|string timestamp Unix seconds
-- @tparam string body
-- @treturn string `v1,<base64>`
function M.sign(secret, id, timestamp, body)
  local key = M.key(secret)
  if not key then error("lbatch.notify.sign: the secret is not whsec_<base64>", 2) end
  if type(timestamp) == "number" then timestamp = ("%d"):format(timestamp) end
  return "v1," .. core.base64(core.hmac_sha256(key, ("%s.%s.%s"):format(id, timestamp, body)))
end

--- A receiver.
-- @tparam table o secrets (a list of `whsec_...`; the first signs
-- nothing, any one verifies), tolerance (seconds, 300), max_body (bytes,
-- 1 MiB), remember (webhook ids kept against replays, 10,000), dashscope
-- (false: refuse DashScope's unsigned callbacks), clock (a function
-- returning Unix seconds, os.time)
-- @treturn table the receiver
function M.new(o)
  o = o or {}
  if type(o) ~= "table" then error("lbatch.notify.new: options must be a table", 2) end
  local secrets = o.secrets or {}
  if type(secrets) == "string" then secrets = { secrets } end
  if type(secrets) ~= "table" then error("lbatch.notify.new: secrets must be a list of strings", 2) end
  local keys = {}
  for i, s in ipairs(secrets) do
    local k = M.key(s)
    if not k then error(("lbatch.notify.new: secrets[%d] is not whsec_<base64>"):format(i), 2) end
    keys[#keys + 1] = k
  end
  for _, f in ipairs({ "tolerance", "max_body", "remember" }) do
    local v = o[f]
    if v ~= nil and (type(v) ~= "number" or v ~= v or v <= 0) then
      error(("lbatch.notify.new: %s must be a number > 0"):format(f), 2)
    end
  end
  if o.clock ~= nil and type(o.clock) ~= "function" then error("lbatch.notify.new: clock must be a function", 2) end
  return setmetatable({
    keys = keys, tolerance = o.tolerance or 300, max_body = o.max_body or MAX_BODY,
    remember = o.remember or REMEMBER, dashscope = o.dashscope ~= false, clock = o.clock or os.time,
    seen = {}, order = {}, head = 1, tail = 0,
  }, Notify)
end

-- a header by lower-case name (a list value: its one element); false
-- when it comes twice (two cases, or a list) with different values
local function header(headers, name)
  local found
  for k, v in pairs(headers) do
    if type(k) == "string" and k:lower() == name then
      if type(v) == "table" then
        if #v > 1 then return false end
        v = v[1]
      end
      if type(v) ~= "string" or (found and found ~= v) then return false end
      found = v
    end
  end
  return found
end

-- the ids remembered: none older than twice the tolerance (a replay that
-- old fails the timestamp anyway), never more than `remember`
local function forget_old(self, t)
  local order = self.order
  while self.head <= self.tail do
    local e = order[self.head]
    if self.tail - self.head + 1 <= self.remember and t - e[2] <= 2 * self.tolerance then break end
    order[self.head] = nil
    if self.seen[e[1]] == e then self.seen[e[1]] = nil end
    self.head = self.head + 1
  end
end

local function remember(self, id, t)
  local e = { id, t }
  self.tail = self.tail + 1
  self.order[self.tail] = e
  self.seen[id] = e
  forget_old(self, t)
end

-- DashScope's callback: the batch itself, unsigned
local function callback(self, body)
  if not self.dashscope then
    return refuse("webhook_unsigned", "an unsigned delivery (no webhook-signature header)")
  end
  local b = json.object(body)
  if not b or type(b.id) ~= "string" or b.id == "" or #b.id > 200 then
    return refuse("webhook_payload", "an unsigned delivery that is not a batch")
  end
  return { type = "dashscope.callback", batch_id = b.id,
           status = type(b.status) == "string" and b.status or nil, data = b, signed = false }
end

--- Verify one delivery and say what it means.
-- @tparam table headers the request's headers (names in any case)
-- @tparam string body the raw body, as it came
-- @treturn table the notice: id (webhook-id), type (`batch.completed`,
-- ...; `dashscope.callback` for DashScope's), batch_id, data (the event's
-- data, or the batch DashScope posted), created_at, signed; or nil and
-- an `invalid` error (code webhook_body_too_large, webhook_headers,
-- webhook_timestamp, webhook_signature, webhook_replay, webhook_payload,
-- webhook_unsigned, webhook_no_secret)
function Notify:verify(headers, body)
  if type(headers) ~= "table" then error("lbatch.notify.verify: headers must be a table", 2) end
  if type(body) ~= "string" then error("lbatch.notify.verify: body must be a string", 2) end
  if #body > self.max_body then
    return refuse("webhook_body_too_large", ("a body of %d bytes (at most %d)"):format(#body, self.max_body))
  end
  local sigs = header(headers, "webhook-signature")
  local id, ts = header(headers, "webhook-id"), header(headers, "webhook-timestamp")
  -- only a delivery with none of Standard Webhooks' headers can be
  -- DashScope's callback: one that has some of them must be signed
  if sigs == nil and id == nil and ts == nil then return callback(self, body) end
  if sigs == nil then
    return refuse("webhook_headers", "webhook-signature is missing: a delivery with webhook-id or "
      .. "webhook-timestamp is a Standard Webhooks one, and must be signed")
  end
  if not sigs or not id or id == "" or not ts then
    return refuse("webhook_headers", "webhook-id, webhook-timestamp or webhook-signature is missing or repeated")
  end
  if #self.keys == 0 then return refuse("webhook_no_secret", "a signed delivery, and no secret to check it") end
  local t = self.clock()
  local when = ts:match("^%d+$") and tonumber(ts)
  if not when then return refuse("webhook_timestamp", "webhook-timestamp is not a number") end
  if math.abs(t - when) > self.tolerance then
    return refuse("webhook_timestamp", ("webhook-timestamp is %d s away (at most %d)"):format(
      math.floor(math.abs(t - when)), self.tolerance))
  end
  local signed = ("%s.%s.%s"):format(id, ts, body)
  local ok = false
  for _, key in ipairs(self.keys) do
    local want = core.base64(core.hmac_sha256(key, signed))
    for part in sigs:gmatch("%S+") do
      local v, sig = part:match("^(v%d+),(.*)$")
      -- every signature is compared, a match or not: no early exit
      if v == "v1" and core.equal(sig, want) then ok = true end
    end
  end
  if not ok then return refuse("webhook_signature", "no signature matches") end
  forget_old(self, t)
  if self.seen[id] then return refuse("webhook_replay", "webhook-id " .. id .. " was delivered before") end
  local event = json.object(body)
  if not event or type(event.type) ~= "string" then
    return refuse("webhook_payload", "the body is not an event")
  end
  remember(self, id, t)
  local data = type(event.data) == "table" and event.data or {}
  return { id = id, type = event.type, event_id = event.id,
           batch_id = M.TYPES[event.type] and type(data.id) == "string" and data.id or nil,
           data = data, created_at = tonumber(event.created_at), signed = true }
end

--- What any HTTP server's handler does with one delivery: verify it and
-- tell the client. The adapters (`lbatch.lua_http`, `lbatch.openresty`)
-- are this and their server's way of reading a request.
--
--    local handle = require("lbatch.notify").handler{ client = c, secrets = { "whsec_..." } }
--    local status = handle(method, headers, body)   -- answer it, with no body
-- @tparam table o client (the client to tell, or a function returning
-- it), notifier (a receiver made already; else one is made from `o`, as
-- `new`), on_notice(notice) and on_refused(err): called for each delivery
-- @treturn function handle(method, headers, body) -> 200 and the notice,
-- 400 and the error, or 405 for what is not a POST
function M.handler(o)
  if type(o) ~= "table" then error("lbatch.notify.handler: options must be a table", 2) end
  local n = o.notifier or M.new(o)
  return function(method, headers, body)
    if method ~= "POST" then return 405 end
    local notice, err = n:verify(headers, body)
    if not notice then
      if o.on_refused then o.on_refused(err) end
      return 400, err
    end
    local client = o.client
    if type(client) == "function" then client = client() end
    if client then client:notice(notice) end
    if o.on_notice then o.on_notice(notice) end
    return 200, notice
  end, n
end

return M
