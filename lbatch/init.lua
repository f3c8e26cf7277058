-- lbatch: a client for the OpenAI-compatible Batch File API (DashScope,
-- OpenAI) on libcurl's multi interface.
--
--   local lbatch = require "lbatch"
--   local client = lbatch.new{ region = "cn" }
--   local file = assert(client:upload("requests.jsonl"))
local Client = require "lbatch.client"
local errors = require "lbatch.errors"

return {
  new = Client.new,
  VERSION = Client.VERSION,
  REGIONS = Client.REGIONS,
  is_error = errors.is,
}
