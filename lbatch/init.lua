--- lbatch: a client for the OpenAI-compatible Batch File API (DashScope,
-- OpenAI) on libcurl's multi interface.
--
--    local lbatch = require "lbatch"
--    local client = lbatch.new{ region = "cn" }
--    local file = assert(client:upload("requests.jsonl"))
--
-- A key goes to its own provider only: with no `provider`, `region` or
-- `api_key`, the provider is the one whose key variable is set
-- (`DASHSCOPE_API_KEY`: dashscope, `OPENAI_API_KEY`: openai,
-- `GROQ_API_KEY`: groq, ...); several set, DashScope with its own, said in
-- `client.config.warning`.
--
-- Several clients (services, regions, keys) on one loop:
--
--    local sched = lbatch.scheduler()
--    local a = lbatch.new{ region = "cn", scheduler = sched }
--    local b = lbatch.new{ region = "openai", scheduler = sched }
-- @module lbatch
local Client = require "lbatch.impl.api.client"
local Scheduler = require "lbatch.impl.transport.scheduler"
local errors = require "lbatch.impl.transport.errors"
local service = require "lbatch.impl.api.service"

-- plain Lua 5.1: raised, not returned (the environment, not a runtime
-- failure; 5.1's assert would hide an error object)
local unsupported = require("lbatch.impl.transport.loop").UNSUPPORTED
local function refuse() error(unsupported, 2) end

return {
  --- Make a client (see `Client.new` below). Raises on plain Lua 5.1.
  new = unsupported and refuse or Client.new,
  --- Make a scheduler for several clients (see `lbatch.scheduler.new`).
  scheduler = unsupported and refuse or Scheduler.new,
  --- lbatch's version.
  _VERSION = Client.VERSION,
  VERSION = Client.VERSION,
  --- Base URLs by region.
  REGIONS = service.REGIONS,
  --- The final statuses of a batch (a set).
  FINAL = service.FINAL,
  --- Is `x` an lbatch error object?
  is_error = errors.is,
}
