-- The real-time endpoints (POST /v1/chat/completions, /v1/embeddings): a
-- request answered at once, as the batch engine answers the same body in
-- a batch's line (emu.engine's answer: one model of both).
local respond = require "emu.respond"
local engine = require "emu.engine"
local admin = require "emu.admin"
local cjson = require "cjson"

local R = {}

-- endpoint: the route's path as OpenAI's (/v1/chat/completions)
function R.handle(endpoint)
  local body, e = respond.read_json()
  if not body then return e end
  admin.note("body", body)
  local status, answer = engine.answer(endpoint, body, cjson.encode(body))
  return respond.json(status, answer)
end

return R
