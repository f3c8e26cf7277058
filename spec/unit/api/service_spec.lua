-- lbatch.service: the service's facts, written once (no server, no nginx).
local service = require "lbatch.impl.api.service"

describe("service facts", function()
  it("has each region's base URL, over https, and its dialect", function()
    assert.are.same({
      cn = "https://dashscope.aliyuncs.com/compatible-mode/v1",
      intl = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
      openai = "https://api.openai.com/v1",
    }, service.REGIONS)
    local dialect = { cn = "dashscope", intl = "dashscope", openai = "openai" }
    for name in pairs(service.PROVIDERS) do
      if name ~= "dashscope" then dialect[name] = "openai" end    -- every other provider speaks OpenAI's
    end
    assert.are.same(dialect, service.DIALECT)
  end)

  it("knows which statuses are final, and which of those left requests unrun", function()
    assert.are.same({ completed = true, failed = true, expired = true, cancelled = true }, service.FINAL)
    assert.are.same({ expired = true, cancelled = true }, service.PARTIAL)
    for k in pairs(service.PARTIAL) do assert.is_true(service.FINAL[k]) end
    for _, live in ipairs({ "validating", "in_progress", "finalizing", "cancelling" }) do
      assert.is_nil(service.FINAL[live], live)
    end
  end)

  it("holds every status set once: each status is final or active, never both; the bad ones are the final but completed", function()
    assert.are.equal(8, #service.STATUSES)
    for _, st in ipairs(service.STATUSES) do
      assert.is_true((service.FINAL[st] or false) ~= (service.ACTIVE[st] or false), st)
      assert.are.equal(service.FINAL[st] and st ~= "completed" or nil, service.FINAL_BAD[st], st)
    end
    -- the command and top read these sets; neither restates one
    local root = os.getenv("LBATCH_ROOT") or "."
    for _, file in ipairs({ "cmd/cli.lua", "cmd/top.lua" }) do
      local f = assert(io.open(root .. "/lbatch/" .. file, "rb"))
      local src = f:read("*a")
      f:close()
      assert.is_nil(src:find("in_progress = true", 1, true), file)
      assert.is_nil(src:find("expired = true", 1, true), file)
    end
  end)

  it("lists each dialect's endpoints", function()
    local ds, oa = service.PROFILES.dashscope.endpoints, service.PROFILES.openai.endpoints
    assert.are.same({ ["/v1/chat/completions"] = true, ["/v1/embeddings"] = true, ["/v1/chat/ds-test"] = true }, ds)
    assert.are.same({ ["/v1/chat/completions"] = true, ["/v1/embeddings"] = true, ["/v1/responses"] = true,
                      ["/v1/completions"] = true, ["/v1/moderations"] = true, ["/v1/images/generations"] = true,
                      ["/v1/images/edits"] = true, ["/v1/videos"] = true }, oa)
    assert.are.same(ds, service.PROFILES["dashscope-strict"].endpoints)
    for url in pairs(ds) do assert.is_true(service.ENDPOINTS[url]) end
    for url in pairs(oa) do assert.is_true(service.ENDPOINTS[url]) end
    assert.are.equal("messages", service.ENDPOINT_RULES["/v1/chat/completions"].field)
    assert.is_true(service.ENDPOINT_RULES["/v1/moderations"].model_optional)
  end)
end)

describe("limits profiles", function()
  local MB = 1024 * 1024

  it("dashscope: the current documents' numbers", function()
    local p = service.PROFILES.dashscope
    assert.are.equal("dashscope", p.name)
    assert.are.equal(50000, p.max_lines)
    assert.are.equal(500 * MB, p.max_bytes)
    assert.are.equal(6 * MB, p.max_line_bytes)
    assert.are.equal(24, p.min_window_hours)
    assert.are.equal(336, p.max_window_hours)
    assert.are.equal(1000, p.create_per_minute)
    assert.are.equal(1000, p.running)
    assert.are.equal(100, p.list_per_minute)
    assert.are.equal(10000, p.max_files)
    assert.are.equal(service.LIMITS, p)
  end)

  it("dashscope-strict: 1 MB lines, 100 creates with 100 running, retrieve 300, cancel 100", function()
    local p = service.PROFILES["dashscope-strict"]
    assert.are.equal(1 * MB, p.max_line_bytes)
    assert.are.equal(100, p.create_per_minute)
    assert.are.equal(100, p.running)
    assert.are.equal(300, p.retrieve_per_minute)
    assert.are.equal(100, p.cancel_per_minute)
    assert.are.equal("dashscope", p.dialect)
  end)

  it("openai: 200 MB files, 50,000 embedding inputs, a 24h window only", function()
    local p = service.PROFILES.openai
    assert.are.equal(200 * MB, p.max_bytes)
    assert.are.equal(50000, p.max_embedding_inputs)
    assert.are.equal(24, p.min_window_hours)
    assert.are.equal(24, p.max_window_hours)
    assert.is_nil(p.max_files)
  end)

  it("service.profile: by name, by region, the default, or nil", function()
    assert.are.equal(service.PROFILES.dashscope, service.profile())
    assert.are.equal(service.PROFILES["dashscope-strict"], service.profile("dashscope-strict"))
    assert.are.equal(service.PROFILES.dashscope, service.profile("cn"))
    assert.are.equal(service.PROFILES.dashscope, service.profile("intl"))
    assert.are.equal(service.PROFILES.openai, service.profile("openai"))
    assert.is_nil(service.profile("eu"))
  end)

  it("the free test model: 100 lines, 1 MB, 2 running, on /v1/chat/ds-test", function()
    assert.are.same({ model = "batch-test-model", url = "/v1/chat/ds-test", max_lines = 100, max_bytes = MB, running = 2 },
                    service.TEST)
  end)
end)

describe("models", function()
  it("serves: a region's list for an endpoint, and every model elsewhere", function()
    assert.is_true((service.serves("cn", "/v1/chat/completions", "qwen-plus")))
    assert.is_true((service.serves("cn", "/v1/embeddings", "text-embedding-v4")))
    local ok, list = service.serves("intl", "/v1/embeddings", "text-embedding-v4")
    assert.is_false(ok)
    assert.are.same({}, list)
    assert.is_false((service.serves("cn", "/v1/chat/completions", "gpt-4o")))
    assert.is_false((service.serves("cn", "/v1/unknown", "qwen-plus")))
    assert.is_true(service.serves("openai", "/v1/chat/completions", "anything"))
  end)

  it("is_embedding_model", function()
    assert.is_true(service.is_embedding_model("text-embedding-v4"))
    assert.is_false(service.is_embedding_model("qwen-plus"))
  end)

  it("thinking: the request's enable_thinking, else the model's default", function()
    local cases = {
      { { model = "qwen3.5-plus" }, true }, { { model = "qwen3.8-flash" }, true },
      { { model = "qwen3-32b" }, true }, { { model = "qwq-plus" }, true }, { { model = "deepseek-r1" }, true },
      { { model = "some-thinking" }, true },
      { { model = "qwen-plus" }, false }, { { model = "qwen3-max" }, false }, { { model = "qwen3.4-plus" }, false },
      { { model = "qwen3-32b-instruct" }, false }, { { model = "deepseek-v3" }, false }, { {}, false },
      { { model = "qwen3.5-plus", enable_thinking = false }, false },
      { { model = "qwen-plus", enable_thinking = true }, true },
      { { model = "qwen3.5-plus", enable_thinking = "no" }, true },   -- not a boolean: the model's default
    }
    for _, c in ipairs(cases) do
      assert.are.equal(c[2], service.thinking(c[1]), tostring(c[1].model) .. " " .. tostring(c[1].enable_thinking))
    end
  end)
end)

describe("dates", function()
  it("days_from_civil: days since 1970-01-01, leap years and before 1970", function()
    assert.are.equal(0, service.days_from_civil(1970, 1, 1))
    assert.are.equal(-1, service.days_from_civil(1969, 12, 31))
    assert.are.equal(59, service.days_from_civil(1970, 3, 1))                 -- 1970: not a leap year
    assert.are.equal(11017, service.days_from_civil(2000, 3, 1))              -- 2000: a leap year (400)
    assert.are.equal(1, service.days_from_civil(2000, 3, 1) - service.days_from_civil(2000, 2, 29))
    assert.are.equal(1, service.days_from_civil(2100, 3, 1) - service.days_from_civil(2100, 2, 28))   -- 2100: not
    assert.are.equal(366, service.days_from_civil(2025, 1, 1) - service.days_from_civil(2024, 1, 1))
    assert.are.equal(365, service.days_from_civil(2026, 1, 1) - service.days_from_civil(2025, 1, 1))
  end)

  it("http_date: an IMF-fixdate as seconds since the epoch, nil for anything else", function()
    assert.are.equal(784111777, service.http_date("Sun, 06 Nov 1994 08:49:37 GMT"))   -- RFC 9110's example
    assert.are.equal(0, service.http_date("Thu, 01 Jan 1970 00:00:00 GMT"))
    assert.are.equal(1709251199, service.http_date("Thu, 29 Feb 2024 23:59:59 GMT"))
    assert.are.equal(1735689600, service.http_date("Wed, 01 Jan 2025 00:00:00 GMT"))
    assert.is_nil(service.http_date("Sun, 06 Foo 1994 08:49:37 GMT"))
    assert.is_nil(service.http_date("120"))
    assert.is_nil(service.http_date(""))
  end)

  it("ts14: a list filter's yyyyMMddHHmmss (UTC), nil otherwise", function()
    assert.are.equal(1709251199, service.ts14("20240229235959"))
    assert.are.equal(0, service.ts14("19700101000000"))
    assert.is_nil(service.ts14("2024022923595"))
    assert.is_nil(service.ts14("202402292359590"))
    assert.is_nil(service.ts14("2024-02-29T23:59"))
  end)
end)
