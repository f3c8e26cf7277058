-- lbatch.lua_http with no server: its onstream handler given stand-ins for
-- lua-http's stream and headers (the real server runs in
-- spec/integration/public/notify_spec.lua, on LuaJIT where Debian has lua-http).
local notify = require "lbatch.notify"

local ok_http = pcall(require, "http.headers")

local function stream(method, headers, body)
  local sent = {}
  local req = {
    get = function(_, k) return k == ":method" and method or nil end,
    each = function()
      local list = { { ":method", method } }
      for k, v in pairs(headers) do list[#list + 1] = { k, v } end
      local i = 0
      return function() i = i + 1 if list[i] then return list[i][1], list[i][2] end end
    end,
  }
  return {
    get_headers = function() return req end,
    get_body_chars = function(_, n) return body:sub(1, n) end,          -- as lua-http: at most n
    write_headers = function(_, h, done)
      sent.status, sent.length, sent.done = h:get(":status"), h:get("content-length"), done
    end,
  }, sent
end

describe("lbatch.lua_http", function()
  if not ok_http then
    it("needs lua-http (Debian builds it for LuaJIT and 5.1-5.3)", function() pending("no lua-http here") end)
    return
  end
  local lua_http = require "lbatch.lua_http"
  local secret = "whsec_" .. require("lbatch.core").base64(("k"):rep(24))

  it("answers 200 to a signed notice and hands it to the client, 400 to a forged one, 405 to a GET", function()
    local told = {}
    local client = { notice = function(_, n) told[#told + 1] = n.batch_id end }
    local handler = lua_http.onstream({ client = client, secrets = { secret } })
    local body = '{"object":"event","id":"evt_1","type":"batch.completed","created_at":1,"data":{"id":"batch_1"}}'
    local ts = tostring(os.time())
    local sig = notify.sign(secret, "msg_1", ts, body)
    local s, sent = stream("POST", { ["webhook-id"] = "msg_1", ["webhook-timestamp"] = ts, ["webhook-signature"] = sig }, body)
    handler(nil, s)
    assert.are.equal("200", sent.status)
    assert.are.same({ "batch_1" }, told)
    s, sent = stream("POST", { ["webhook-id"] = "msg_2", ["webhook-timestamp"] = ts, ["webhook-signature"] = sig },
      body:gsub("batch_1", "batch_2"))
    handler(nil, s)
    assert.are.equal("400", sent.status)
    assert.are.same({ "batch_1" }, told)
    s, sent = stream("GET", {}, "")
    handler(nil, s)
    assert.are.equal("405", sent.status)
    -- each answer is whole: an empty body of a stated length, the stream ended
    assert.are.same({ "0", true }, { sent.length, sent.done })
  end)

  it("refuses a body over max_body as too large, one byte over included", function()
    local refused = {}
    local handler = lua_http.onstream({ secrets = { secret }, max_body = 100,
      on_refused = function(err) refused[#refused + 1] = err.code end })
    local ts = tostring(os.time())
    for _, size in ipairs({ 100, 101 }) do
      local body = ('{"object":"event","id":"evt_1","type":"batch.completed","data":{"id":"batch_1"},"pad":"%s"}')
      body = body:format(("p"):rep(size - #body:format("")))
      assert.are.equal(size, #body)
      local s, sent = stream("POST", { ["webhook-id"] = "msg_" .. size, ["webhook-timestamp"] = ts,
        ["webhook-signature"] = notify.sign(secret, "msg_" .. size, ts, body) }, body)
      handler(nil, s)
      assert.are.equal(size <= 100 and "200" or "400", sent.status, size)
      assert.are.equal("0", sent.length)
    end
    assert.are.same({ "webhook_body_too_large" }, refused)
  end)
end)
