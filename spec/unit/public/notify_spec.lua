-- lbatch.notify: Standard Webhooks as OpenAI signs them, held to what the
-- `standardwebhooks` npm package and the `openai` SDK make and accept
-- (spec/fixtures/webhooks/vectors.json, written by
-- emulator/conformance/webhook-vectors.mjs; the #conformance test runs it
-- live), and DashScope's unsigned callback as a hint. Pure: no server.
local H = require "helper"
local json = require "cjson"
local notify = require "lbatch.notify"

local VECTORS = H.root .. "/spec/fixtures/webhooks/vectors.json"
local SCRIPT = H.root .. "/emulator/conformance/webhook-vectors.mjs"

local function headers(v, extra)
  local h = { ["Webhook-Id"] = v.id, ["WEBHOOK-TIMESTAMP"] = ("%d"):format(v.timestamp),
              ["webhook-signature"] = v.signature }
  for k, x in pairs(extra or {}) do
    for old in pairs(h) do if old:lower() == k:lower() then h[old] = nil end end
    h[k] = x
  end
  return h
end

local function at(t) return function() return t end end

describe("lbatch.notify", function()
  local vectors
  setup(function() vectors = json.decode(H.read(VECTORS)) end)

  it("accepts every delivery signed by standardwebhooks (checked by the openai SDK)", function()
    assert.is_true(#vectors >= 12)
    for _, v in ipairs(vectors) do
      local n = notify.new({ secrets = { v.secret }, clock = at(v.timestamp) })
      local got, err = n:verify(headers(v), v.body)
      assert.is_nil(err, v.id)
      assert.are.same({ v.id, v.type, v.batch_id, true }, { got.id, got.type, got.batch_id, got.signed })
      assert.are.equal(v.batch_id, got.data.id)
    end
  end)

  it("accepts every secret of a rotation, and several signatures in one header", function()
    local secrets = {}
    for _, v in ipairs(vectors) do secrets[#secrets + 1] = v.secret end
    for _, v in ipairs(vectors) do
      local n = notify.new({ secrets = secrets, clock = at(v.timestamp) })
      assert.truthy(n:verify(headers(v), v.body))
      local other = notify.sign("whsec_" .. ("b"):rep(32), v.id, v.timestamp, v.body)
      local n2 = notify.new({ secrets = { v.secret }, clock = at(v.timestamp) })
      local sig = "v0,abc " .. other .. " " .. v.signature
      assert.truthy(n2:verify(headers(v, { ["webhook-signature"] = sig }), v.body))
    end
  end)

  it("signs as standardwebhooks does", function()
    for _, v in ipairs(vectors) do
      assert.are.equal(v.signature, notify.sign(v.secret, v.id, v.timestamp, v.body))
    end
  end)

  it("refuses a tampered body, a wrong secret, a stale or future timestamp and a replayed id", function()
    local v = vectors[1]
    local function code(n, h, body)
      local got, err = n:verify(h, body)
      assert.is_nil(got)
      assert.are.equal("invalid", err.kind)
      return err.code
    end
    local n = notify.new({ secrets = { v.secret }, clock = at(v.timestamp) })
    assert.are.equal("webhook_signature", code(n, headers(v), v.body:gsub("batch_vec", "batch_evil")))
    assert.are.equal("webhook_signature", code(n, headers(v), v.body .. " "))
    assert.are.equal("webhook_signature", code(n, headers(v, { ["webhook-id"] = v.id .. "x" }), v.body))
    assert.are.equal("webhook_signature",
      code(n, headers(v, { ["webhook-timestamp"] = ("%d"):format(v.timestamp + 1) }), v.body))
    assert.are.equal("webhook_signature",
      code(n, headers(v, { ["webhook-signature"] = v.signature:sub(1, -3) }), v.body))
    assert.are.equal("webhook_signature",
      code(n, headers(v, { ["webhook-signature"] = "v2," .. v.signature:sub(4) }), v.body))
    local wrong = notify.new({ secrets = { vectors[#vectors].secret }, clock = at(v.timestamp) })
    assert.are.equal("webhook_signature", code(wrong, headers(v), v.body))
    local late = notify.new({ secrets = { v.secret }, clock = at(v.timestamp + 301) })
    assert.are.equal("webhook_timestamp", code(late, headers(v), v.body))
    local early = notify.new({ secrets = { v.secret }, clock = at(v.timestamp - 301) })
    assert.are.equal("webhook_timestamp", code(early, headers(v), v.body))
    local edge = notify.new({ secrets = { v.secret }, clock = at(v.timestamp + 300) })
    assert.truthy(edge:verify(headers(v), v.body))
    assert.truthy(n:verify(headers(v), v.body))
    assert.are.equal("webhook_replay", code(n, headers(v), v.body))
    assert.are.equal("webhook_headers", code(n, { ["webhook-signature"] = v.signature }, v.body))
    local twice = headers(v)
    twice["webhook-id"] = "msg_other"          -- Webhook-Id too: which one was signed?
    assert.are.equal("webhook_headers", code(n, twice, v.body))
    local small = notify.new({ secrets = { v.secret }, clock = at(v.timestamp), max_body = 64 })
    assert.are.equal("webhook_body_too_large", code(small, headers(v), v.body))
    local none = notify.new({ clock = at(v.timestamp) })
    assert.are.equal("webhook_no_secret", code(none, headers(v), v.body))
  end)

  it("forgets old ids, within its bound", function()
    local secret = vectors[1].secret
    local t = 1751500000
    local n = notify.new({ secrets = { secret }, remember = 3, clock = function() return t end })
    local function deliver(id)
      local body = '{"type":"batch.completed","data":{"id":"batch_1"}}'
      return n:verify({ ["webhook-id"] = id, ["webhook-timestamp"] = tostring(t),
                        ["webhook-signature"] = notify.sign(secret, id, t, body) }, body)
    end
    local function remembered()
      local count = 0
      for _ in pairs(n.seen) do count = count + 1 end
      return count
    end
    for i = 1, 10 do
      assert.truthy(deliver("msg_" .. i))
      assert.are.equal(math.min(i, 3), remembered())       -- never more than `remember`, also between calls
    end
    assert.is_nil((deliver("msg_10")))
    assert.are.equal(3, remembered())
  end)

  it("takes DashScope's unsigned callback as a hint only, unless refused", function()
    local n = notify.new({ secrets = { vectors[1].secret } })
    local got = assert(n:verify({ ["Content-Type"] = "application/json" },
      '{"id":"batch_abc","object":"batch","status":"completed"}'))
    assert.are.same({ "dashscope.callback", "batch_abc", "completed", false },
      { got.type, got.batch_id, got.status, got.signed })
    assert.is_nil((n:verify({}, "not json")))
    local strict = notify.new({ secrets = { vectors[1].secret }, dashscope = false })
    local _, err = strict:verify({}, '{"id":"batch_abc"}')
    assert.are.equal("webhook_unsigned", err.code)
  end)

  it("refuses a Standard Webhooks delivery without its signature: it is not DashScope's callback", function()
    local v = vectors[1]
    local batch = '{"id":"batch_abc","object":"batch","status":"completed"}'
    for _, n in ipairs({ notify.new({ secrets = { v.secret }, clock = at(v.timestamp) }),
                         notify.new({ clock = at(v.timestamp) }),
                         notify.new({ secrets = { v.secret }, clock = at(v.timestamp), dashscope = false }) }) do
      for _, h in ipairs({ { ["Webhook-Id"] = v.id, ["webhook-timestamp"] = ("%d"):format(v.timestamp) },
                           { ["webhook-id"] = v.id }, { ["WEBHOOK-TIMESTAMP"] = ("%d"):format(v.timestamp) } }) do
        for _, body in ipairs({ batch, v.body }) do
          local got, err = n:verify(h, body)
          assert.is_nil(got)
          assert.are.same({ "invalid", "webhook_headers" }, { err.kind, err.code })
        end
      end
      local _, err = n:verify({ ["webhook-id"] = v.id }, batch)
      assert.matches("webhook-signature is missing", err.message, 1, true)
    end
    -- none of the three: DashScope's callback, as before
    local got = assert(notify.new({ clock = at(v.timestamp) }):verify({ ["x-other"] = "1" }, batch))
    assert.are.same({ "dashscope.callback", false }, { got.type, got.signed })
  end)

  it("refuses what is not a secret or an option", function()
    assert.has_error(function() notify.new({ secrets = { "whsec_not base64!" } }) end)
    assert.has_error(function() notify.new({ tolerance = -1 }) end)
    assert.has_error(function() notify.new({ secrets = { "whsec_" .. ("A"):rep(32) } }):verify(nil, "") end)
  end)
end)

describe("lbatch.notify against live vectors #conformance", function()
  it("accepts what standardwebhooks and the openai SDK sign now, with random secrets", function()
    if not H.exists(H.root .. "/emulator/conformance/node_modules/standardwebhooks") then
      pending("npm install in emulator/conformance first")
      return
    end
    local out = H.sh(("node %s --now"):format(H.q(SCRIPT)))
    local vectors = json.decode(out)
    assert.is_true(#vectors >= 12)
    for _, v in ipairs(vectors) do
      local n = notify.new({ secrets = { v.secret } })
      assert.truthy(n:verify(headers(v), v.body))
    end
  end)
end)
