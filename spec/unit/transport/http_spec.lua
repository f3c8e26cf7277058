-- lbatch.http: requests built, answers mapped to values or errors, retries;
-- on hand-made core results and a fake loop (no server, no nginx).
local http = require "lbatch.impl.transport.http"
local config = require "lbatch.impl.api.config"
local errors = require "lbatch.impl.transport.errors"

local function imf(t) return os.date("!%a, %d %b %Y %H:%M:%S GMT", t) end

describe("http: requests", function()
  it("urlencode keeps RFC 3986's unreserved characters and encodes every other byte", function()
    assert.are.equal("AZaz09-._~", http.urlencode("AZaz09-._~"))
    assert.are.equal("a%20b%2Fc%3Fd%3De%26f%23g%25h%2B", http.urlencode("a b/c?d=e&f#g%h+"))
    assert.are.equal("%C3%A9%E4%B8%AD", http.urlencode("é中"))
    assert.are.equal("%00%0D%0A", http.urlencode("\0\r\n"))
    assert.are.equal("42", http.urlencode(42))
  end)

  it("query: sorted, encoded, lists comma-joined, false and non-string keys left out", function()
    assert.are.equal("", http.query(nil))
    assert.are.equal("", http.query({}))
    assert.are.equal("", http.query({ after = false }))
    assert.are.equal("?after=b%201&limit=10&z=1", http.query({ z = 1, limit = 10, after = "b 1", skipped = false }))
    assert.are.equal("?ds_name=a%2Cb&status=in_progress%2Ccompleted",
                     http.query({ status = { "in_progress", "completed" }, ds_name = "a,b", "positional" }))
    assert.are.equal("?a%26b=c%3Dd", http.query({ ["a&b"] = "c=d" }))
    local many, want = {}, {}
    for i, k in ipairs({ "k", "c", "x", "a", "q", "m", "b", "z", "f", "t", "e", "h" }) do many[k] = i end
    for k in ("abcefhkmqtxz"):gmatch(".") do want[#want + 1] = k .. "=" .. many[k] end
    assert.are.equal("?" .. table.concat(want, "&"), http.query(many))   -- the same request every time
  end)

  it("path_id: an id for one path segment, or an invalid error", function()
    assert.are.equal("file-abc_123", http.path_id("retrieve", "id", "file-abc_123"))
    assert.are.equal("batch%20one~", http.path_id("retrieve", "id", "batch one~"))
    for _, id in ipairs({ "", ".", "..", "a/b", "a\\b", "a?b", "a#b", "a%2Fb", "a\nb", "a\0b", "\127" }) do
      local v, err = http.path_id("retrieve", "batch_id", id)
      assert.is_nil(v, ("%q"):format(id))
      assert.is_true(errors.is(err))
      assert.are.equal("invalid", err.kind)
      assert.are.equal("invalid_id", err.code)
      assert.are.equal("batch_id", err.param)
      assert.is_false(err.retryable)
    end
    assert.has_error(function() http.path_id("retrieve", "id", 7) end, "lbatch.retrieve: id must be a string (got number)")
  end)
end)

describe("http: answers", function()
  it("parse_headers: lowercased names, values without leading blanks, the last one wins", function()
    local h = http.parse_headers("HTTP/2 200\r\nContent-Type: application/json\r\nX-Request-Id: \t r-1\r\n"
      .. "Set-Cookie: a=1\r\nset-cookie: b=2\r\nRetry-After-Ms:250\r\n\r\n")
    assert.are.same({ ["content-type"] = "application/json", ["x-request-id"] = "r-1", ["set-cookie"] = "b=2",
                      ["retry-after-ms"] = "250" }, h)
    assert.are.same({}, http.parse_headers(nil))
    assert.are.same({}, http.parse_headers(""))
  end)

  it("retry_after: retry-after-ms first, then seconds, then an HTTP date; never negative", function()
    assert.are.equal(3, http.retry_after({ ["retry-after"] = "3" }))
    assert.are.equal(0.25, http.retry_after({ ["retry-after"] = "0.25" }))
    assert.are.equal(1.5, http.retry_after({ ["retry-after-ms"] = "1500", ["retry-after"] = "9" }))
    assert.are.equal(9, http.retry_after({ ["retry-after-ms"] = "soon", ["retry-after"] = "9" }))
    assert.are.equal(0, http.retry_after({ ["retry-after"] = "-5" }))
    assert.are.equal(0, http.retry_after({ ["retry-after-ms"] = "-5" }))
    assert.is_nil(http.retry_after({}))
    assert.is_nil(http.retry_after({ ["retry-after"] = "whenever" }))
    local wait = http.retry_after({ ["retry-after"] = imf(os.time() + 30) })
    assert.is_true(wait > 27 and wait <= 30, tostring(wait))
    assert.are.equal(0, http.retry_after({ ["retry-after"] = imf(os.time() - 3600) }))
  end)

  local function ok_res(body, headers)
    return { status = 200, code = 0, body = body, headers = headers or "Content-Type: application/json\r\n",
             version = "HTTP/2", time = 0.01 }
  end

  it("a 2xx JSON object: normalized (null is nil, whole numbers integers), meta filled in", function()
    local v, err, meta = http.answer(ok_res('{"id":"batch_1","output_file_id":null,"request_counts":{"total":3},'
      .. '"ratio":0.5}', "X-Request-Id: req-9\r\n"), {})
    assert.is_nil(err)
    assert.are.same({ id = "batch_1", request_counts = { total = 3 }, ratio = 0.5 }, v)
    if math.type then assert.are.equal("integer", math.type(v.request_counts.total)) end
    assert.are.same({ status = 200, headers = { ["x-request-id"] = "req-9" }, version = "HTTP/2", time = 0.01,
                      request_id = "req-9" }, meta)
  end)

  it("a BOM before the JSON is dropped; raw gives the body as it came; a download gives its path", function()
    assert.are.same({ object = "list" }, (http.answer(ok_res('\239\187\191{"object":"list"}'), {})))
    assert.are.equal('not json at all', (http.answer(ok_res("not json at all"), { raw = true })))
    assert.are.equal("", (http.answer(ok_res(nil), { raw = true })))
    local r = ok_res(nil)
    r.path = "/tmp/x.jsonl"
    assert.are.equal("/tmp/x.jsonl", (http.answer(r, {})))
  end)

  it("a 2xx that is not a JSON object is a decode error", function()
    for _, body in ipairs({ "[1,2]", "<html>", "", '"x"', '{"a":' }) do
      local v, err = http.answer(ok_res(body, "X-Request-Id: r2\r\n"), {})
      assert.is_nil(v, body)
      assert.are.equal("decode", err.kind)
      assert.are.equal("invalid_json", err.code)
      assert.are.equal(200, err.status)
      assert.are.equal("r2", err.request_id)
      assert.is_false(err.retryable)
    end
  end)

  it("a page: data is a list of objects (null or junk in it dropped)", function()
    assert.are.same({}, (http.answer(ok_res('{"data":null,"has_more":false}'), { list = true })).data)
    local v = http.answer(ok_res('{"data":[{"id":"a"},1,"x",null,{"id":"b"}]}'), { list = true })
    assert.are.same({ { id = "a" }, { id = "b" } }, v.data)
  end)

  it("an error status: the service's message, code, type, param and request id; retryable as it should be", function()
    local body = '{"error":{"message":"Too many requests","code":"rate_limit_exceeded","type":"requests","param":"x"},'
      .. '"request_id":"body-id"}'
    local v, err, meta = http.answer({ status = 429, code = 0, body = body,
                                       headers = "Retry-After: 7\r\nX-Request-Id: header-id\r\n" }, {})
    assert.is_nil(v)
    assert.are.equal("http", err.kind)
    assert.are.equal(429, err.status)
    assert.are.equal("Too many requests", err.message)
    assert.are.equal("rate_limit_exceeded", err.code)
    assert.are.equal("requests", err.type)
    assert.are.equal("x", err.param)
    assert.are.equal("body-id", err.request_id)     -- the body's id first
    assert.are.equal("body-id", meta.request_id)
    assert.are.equal(7, err.retry_after)
    assert.is_true(err.retryable)
    local retryable = { [400] = false, [401] = false, [403] = false, [404] = false, [408] = true, [409] = true,
                        [422] = false, [429] = true, [499] = false, [500] = true, [502] = true, [503] = true }
    for status, want in pairs(retryable) do
      local _, e = http.answer({ status = status, code = 0, body = "{}", headers = "" }, {})
      assert.are.equal(want, e.retryable, tostring(status))
    end
    local _, e3 = http.answer({ status = 302, code = 0, body = "", headers = "Location: x\r\n" }, {})
    assert.are.equal("http", e3.kind)
  end)

  it("an error status without a JSON message: HTTP N and the start of the body; the header's request id", function()
    local _, err = http.answer({ status = 502, code = 0, body = "<html>\n  Bad   gateway\n</html>",
                                 headers = "X-DashScope-Request-Id: ds-1\r\n" }, {})
    assert.are.equal("HTTP 502: <html> Bad gateway </html>", err.message)
    assert.are.equal("ds-1", err.request_id)
    local _, bare = http.answer({ status = 500, code = 0, body = "", headers = "" }, {})
    assert.are.equal("HTTP 500", bare.message)
    local _, long = http.answer({ status = 500, code = 0, body = ("x"):rep(5000), headers = "" }, {})
    assert.are.equal(#"HTTP 500: " + 200, #long.message)
    local _, top = http.answer({ status = 400, code = 0, body = '{"message":"flat","code":400}', headers = "" }, {})
    assert.are.equal("flat", top.message)
    assert.are.equal("400", top.code)                -- codes are strings
  end)

  it("a transfer with no usable answer: curl's and the core's failures", function()
    local function fail(res)
      res.status = res.status or 0
      res.code = res.code or 0
      local v, err = http.answer(res, {})
      assert.is_nil(v)
      return err
    end
    local e = fail({ code = 7, error = "Failed to connect" })
    assert.are.same({ "network", "curl_7", true, true }, { e.kind, e.code, e.retryable, e.not_sent })
    e = fail({ code = 56, error = "Recv failure" })
    assert.are.same({ "network", "curl_56", true, false }, { e.kind, e.code, e.retryable, e.not_sent })
    e = fail({ code = 28, error = "Timeout" })
    assert.are.same({ "timeout", "curl_28", true }, { e.kind, e.code, e.retryable })
    e = fail({ code = 42, error = "Callback aborted" })
    assert.are.same({ "cancelled", "curl_42", false }, { e.kind, e.code, e.retryable })
    e = fail({ code = 3, error = "URL malformed" })
    assert.are.same({ "network", "curl_3", false }, { e.kind, e.code, e.retryable })
    e = fail({ code = 60, error = "unable to get local issuer certificate" })
    assert.are.same({ "network", "tls_certificate", false }, { e.kind, e.code, e.retryable })
    assert.matches("SSL_CERT_FILE", e.message, 1, true)
    e = fail({ code = 56, connect_code = 407, error = "CONNECT tunnel failed" })
    assert.are.same({ "network", "proxy_auth_required", false }, { e.kind, e.code, e.retryable })
    e = fail({ fail = "stalled", error = "no byte for 30 s" })
    assert.are.same({ "timeout", "stalled", true }, { e.kind, e.code, e.retryable })
    e = fail({ fail = "too_large", status = 200, error = "over max_response_bytes" })
    assert.are.same({ "decode", "response_too_large", false, 200 }, { e.kind, e.code, e.retryable, e.status })
    e = fail({ fail = "truncated", error = "cut" })
    assert.are.same({ "network", "truncated", true }, { e.kind, e.code, e.retryable })
    assert.is_nil(e.status)                       -- status 0: no answer
    e = fail({ fail = "io", error = "disk full" })
    assert.are.same({ "io", false }, { e.kind, e.retryable })
    -- a failure wins over a 2xx status
    e = fail({ fail = "resend", status = 200, error = "connection lost" })
    assert.are.same({ "network", "connection_lost", true }, { e.kind, e.code, e.retryable })
  end)
end)

describe("http: the transport", function()
  -- a loop that answers from a script and records the requests and sleeps
  local function fake_loop(answers)
    local loop = { specs = {}, slept = {} }
    function loop.transfer(_, spec)
      loop.specs[#loop.specs + 1] = spec
      local a = table.remove(answers, 1)
      assert(a, "no more answers")
      if type(a) == "function" then return a(spec) end
      local res = {}
      for k, v in pairs(a) do res[k] = v end
      res.code, res.headers = res.code or 0, res.headers or ""
      return res
    end
    function loop.sleep(_, s) loop.slept[#loop.slept + 1] = s end
    return loop
  end

  local function transport(answers, o)
    local opts = { api_key = "sk-secret-0123456789", base_url = "https://api.example.com/v1", max_retries = 2 }
    for k, v in pairs(o or {}) do opts[k] = v end
    local cfg, secrets = assert(config.new(opts))
    local loop = fake_loop(answers)
    return http.new(cfg, secrets, loop), loop
  end

  it("builds the request: URL, headers (JSON ones with a body), timeouts in ms", function()
    local t, loop = transport({ { status = 200, body = '{"id":"b"}' }, { status = 200, body = "{}" } },
                              { timeout = 5, connect_timeout = 2, stall_timeout = 3, headers = { ["X-Team"] = "core" } })
    assert.are.same({ id = "b" }, (t:call("POST", "/batches", { body = '{"x":1}' })))
    local s = loop.specs[1]
    assert.are.equal("https://api.example.com/v1/batches", s.url)
    assert.are.equal("POST", s.method)
    assert.are.equal('{"x":1}', s.body)
    assert.are.equal("Content-Type: application/json", s.headers[1])
    assert.are.equal("Authorization: Bearer sk-secret-0123456789", s.headers[2])
    assert.are.equal("X-Team: core", s.headers[#s.headers])
    assert.are.same({ 5000, 2000, 3000 }, { s.timeout, s.connect_timeout, s.stall })
    t:call("GET", "/files?limit=1", { stream = true, headers = { "Accept-Encoding: identity" } })
    s = loop.specs[2]
    assert.are.equal("Authorization: Bearer sk-secret-0123456789", s.headers[1])   -- no Content-Type without a body
    assert.are.equal("Accept-Encoding: identity", s.headers[#s.headers])
    assert.are.equal(0, s.timeout)                -- a stream has no whole-request timeout
  end)

  it("retries what is retryable, up to max_retries, waiting the server's Retry-After", function()
    local t, loop = transport({ { status = 503, body = "{}", headers = "Retry-After: 2\r\n" },
                                { code = 7, status = 0, error = "refused" },
                                { status = 200, body = '{"id":"f"}' } })
    local v, err = t:call("GET", "/files/f", {})
    assert.is_nil(err)
    assert.are.same({ id = "f" }, v)
    assert.are.equal(3, #loop.specs)
    assert.are.equal(2, loop.slept[1])
    assert.is_true(loop.slept[2] >= 0.75 and loop.slept[2] <= 1, tostring(loop.slept[2]))   -- 1 s, jittered

    local t2, loop2 = transport({ { status = 500, body = "{}" }, { status = 500, body = "{}" },
                                  { status = 500, body = "{}" }, { status = 200, body = "{}" } })
    local v2, err2 = t2:call("GET", "/files", {})
    assert.is_nil(v2)
    assert.are.equal(500, err2.status)
    assert.are.equal(3, #loop2.specs)             -- 1 + max_retries
    local t3, loop3 = transport({ { status = 500, body = "{}" }, { status = 200, body = "{}" } }, { max_retries = 0 })
    assert.is_nil((t3:call("GET", "/files", {})))
    assert.are.equal(1, #loop3.specs)
  end)

  it("never retries what is not retryable, nor waits longer than retry_after_cap", function()
    local t, loop = transport({ { status = 400, body = '{"error":{"message":"bad"}}' }, { status = 200, body = "{}" } })
    local _, err = t:call("POST", "/batches", { body = "{}" })
    assert.are.equal("bad", err.message)
    assert.are.equal(1, #loop.specs)
    assert.are.same({}, loop.slept)
    local t2, loop2 = transport({ { status = 429, body = "{}", headers = "Retry-After: 120\r\n" },
                                  { status = 200, body = "{}" } }, { retry_after_cap = 60 })
    local _, err2 = t2:call("GET", "/batches", {})
    assert.are.equal(120, err2.retry_after)       -- returned to the caller, who decides
    assert.are.equal(1, #loop2.specs)
    assert.are.same({}, loop2.slept)
  end)

  it("asks recover() before trying again, unless the request never left", function()
    local asked = 0
    local t, loop = transport({ { code = 56, status = 0, error = "cut" }, { status = 200, body = "{}" } })
    local v = t:call("POST", "/batches", { body = "{}", recover = function() asked = asked + 1 return { id = "found" } end })
    assert.are.same({ id = "found" }, v)
    assert.are.equal(1, asked)
    assert.are.equal(1, #loop.specs)
    local t2, loop2 = transport({ { code = 7, status = 0, error = "refused" }, { status = 200, body = '{"id":"new"}' } })
    v = t2:call("POST", "/batches", { body = "{}", recover = function() asked = asked + 1 return { id = "found" } end })
    assert.are.same({ id = "new" }, v)           -- curl 7: not sent, nothing to recover
    assert.are.equal(1, asked)
    assert.are.equal(2, #loop2.specs)
  end)

  it("scrubs the key from whatever the server echoes, except a file's bytes", function()
    local echo = '{"error":{"message":"bad key sk-secret-0123456789 given"}}'
    local t = transport({ { status = 401, body = echo, headers = "X-Echo: sk-secret-0123456789\r\n" } })
    local _, err, meta = t:call("GET", "/files", {})
    assert.are.equal("bad key *** given", err.message)
    assert.are.equal("***", meta.headers["x-echo"])
    local t2 = transport({ { status = 200, body = "line with sk-secret-0123456789\n" } })
    assert.are.equal("line with sk-secret-0123456789\n", (t2:call("GET", "/files/f/content", { raw = true })))
    local t3 = transport({ { status = 200, body = '{"note":"sk-secret-0123456789"}' } })
    assert.are.same({ note = "***" }, (t3:call("GET", "/files/f", {})))
  end)

  it("backoff: Retry-After when given, else 0.5 s doubling up to 8 s, jittered down by at most a quarter", function()
    local t = transport({})
    assert.are.equal(4, t:backoff(5, { retry_after = 4 }))
    assert.are.equal(0, t:backoff(0, { retry_after = 0 }))
    local backoff = t.backoff
    for attempt, top in pairs({ [0] = 0.5, [1] = 1, [2] = 2, [3] = 4, [4] = 8, [5] = 8, [10] = 8 }) do
      for _ = 1, 20 do
        local w = backoff(nil, attempt, {})
        assert.is_true(w >= 0.75 * top and w <= top, ("attempt %d: %s"):format(attempt, w))
      end
    end
  end)
end)
