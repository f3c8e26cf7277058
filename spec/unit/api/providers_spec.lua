-- The providers as data (lbatch.service.PROVIDERS), lbatch.new{provider = ...}
-- and the one shape every provider's answers come out in (lbatch.http.normalise);
-- pure: no server, no nginx.
local H = require "helper"
local service = require "lbatch.impl.api.service"
local config = require "lbatch.impl.api.config"
local http = require "lbatch.impl.transport.http"

local NAMES = { "azure", "cerebras", "dashscope", "groq", "litellm", "moonshot", "novita", "openai",
                "siliconflow", "together", "zhipu" }

local function ok_res(body, status)
  return { code = 0, status = status or 200, headers = "", body = body, version = "HTTP/1.1", time = 0.01 }
end

describe("providers as data", function()
  it("has every provider, each with its key variable, a limits profile, a path prefix and its source", function()
    local names = {}
    for name in pairs(service.PROVIDERS) do names[#names + 1] = name end
    table.sort(names)
    assert.are.same(NAMES, names)
    for name, p in pairs(service.PROVIDERS) do
      assert.are.equal(name, p.name)
      assert.is_string(p.key[1], name)
      assert.is_table(service.PROFILES[p.limits], name)
      assert.are.equal(p.limits, service.profile(name).name)
      assert.is_truthy(p.prefix:find("^/"), name)
      assert.is_string(p.source, name)
      local base = p.base_url or (p.regions and p.regions[p.region])
      if base then
        assert.is_truthy(base:find("^https://"), name)
        assert.are.equal(p.prefix, base:match("^https://[^/]+(/.*)$"), name)
      end
    end
  end)

  it("has each provider's own numbers in its profile", function()
    local P = service.PROFILES
    assert.are.equal(100000, P.azure.max_lines)
    assert.is_true(P.azure.no_bom)
    assert.are.equal(24 * 7, P.groq.max_window_hours)
    assert.are.equal(5000, P.siliconflow.max_lines)
    assert.are.equal(336, P.siliconflow.max_window_hours)
    assert.is_true(P.zhipu.endpoints["/v4/chat/completions"])
    assert.is_nil(P.zhipu.endpoints["/v1/chat/completions"])
    assert.are.same({ ["/v1/chat/completions"] = true }, P.cerebras.endpoints)
    assert.are.equal(100 * 1024 * 1024, P.together.max_bytes)
  end)

  it("reads ISO-8601 times as seconds", function()
    assert.are.equal(0, service.iso8601("1970-01-01T00:00:00Z"))
    assert.are.equal(1714564800, service.iso8601("2024-05-01T12:00:00Z"))
    assert.are.equal(1714564800, service.iso8601("2024-05-01T12:00:00.123456Z"))
    assert.are.equal(1714564800, service.iso8601("2024-05-01T20:00:00+08:00"))
    assert.are.equal(1714564800, service.iso8601("2024-05-01 12:00:00"))
    assert.are.equal(1714521600, service.iso8601("2024-05-01"))
    assert.is_nil(service.iso8601("yesterday"))
  end)
end)

describe("lbatch.new{provider = ...}", function()
  it("takes each provider's base URL, key and limits; refuses an unknown one", function()
    for name, p in pairs(service.PROVIDERS) do
      local o = { provider = name, api_key = "sk-x" }
      if not (p.base_url or p.regions) then o.base_url = "https://llm.example.com" end
      local cfg = assert(config.new(o))
      assert.are.equal(name, cfg.provider)
      assert.are.equal(p.limits, cfg.limits)
    end
    local cfg = assert(config.new({ provider = "groq", api_key = "k" }))
    assert.are.equal("https://api.groq.com/openai/v1", cfg.base_url)
    assert.are.equal("groq", cfg.region)
    cfg = assert(config.new({ provider = "moonshot", region = "cn", api_key = "k" }))
    assert.are.equal("https://api.moonshot.cn/v1", cfg.base_url)
    assert.are.equal(select(2, config.new({ provider = "mistral", api_key = "k" })),
      "provider must be one of " .. table.concat(NAMES, ", ") .. ' (got "mistral")')
    assert.are.equal("region: groq has no regions", select(2, config.new({ provider = "groq", region = "cn",
      api_key = "k" })))
    assert.are.equal("base_url: azure has no fixed one: pass base_url or set AZURE_OPENAI_ENDPOINT",
      select(2, config.new({ provider = "azure", api_key = "k" })))
    -- region alone keeps working
    assert.are.equal("openai", assert(config.new({ region = "openai", api_key = "k" })).provider)
    assert.are.equal(service.REGIONS.intl, assert(config.new({ region = "intl", api_key = "k" })).base_url)
  end)

  it("Azure: the resource's endpoint gets /openai/v1 and the api-key header; api_version is the legacy API", function()
    local cfg, s = assert(config.new({ provider = "azure", api_key = "az-1", base_url = "https://r.openai.azure.com/" }))
    assert.are.equal("https://r.openai.azure.com/openai/v1", cfg.base_url)
    assert.are.equal("api-key: az-1", s.headers[1])
    assert.is_nil(cfg.query)
    cfg = assert(config.new({ provider = "azure", api_key = "az-1", base_url = "https://r.openai.azure.com",
                              api_version = "2024-10-21" }))
    assert.are.equal("https://r.openai.azure.com/openai", cfg.base_url)
    assert.are.equal("api-version=2024-10-21", cfg.query)
    local t = http.new(cfg, { headers = {}, list = {} }, {})
    assert.are.equal("https://r.openai.azure.com/openai/files?api-version=2024-10-21", t:spec("GET", "/files", {}).url)
    assert.are.equal("https://r.openai.azure.com/openai/batches?limit=5&api-version=2024-10-21",
      t:spec("GET", "/batches?limit=5", {}).url)
    assert.are.equal("api_version is Azure's (the legacy API), not groq's",
      select(2, config.new({ provider = "groq", api_key = "k", api_version = "x" })))
    local _, sg = assert(config.new({ provider = "groq", api_key = "gk" }))
    assert.are.equal("Authorization: Bearer gk", sg.headers[1])
  end)

  it("reads the key from the provider's variable", function()
    local vars = { AZURE_OPENAI_API_KEY = "azure", GROQ_API_KEY = "groq", TOGETHER_API_KEY = "together",
      SILICONFLOW_API_KEY = "siliconflow", ZHIPUAI_API_KEY = "zhipu", MOONSHOT_API_KEY = "moonshot",
      CEREBRAS_API_KEY = "cerebras", NOVITA_API_KEY = "novita", LITELLM_API_KEY = "litellm",
      AZURE_OPENAI_ENDPOINT = "https://r.openai.azure.com", LITELLM_BASE_URL = "http://127.0.0.1:4000" }
    local dir = H.tmpdir()
    local script = H.write(dir .. "/k.lua", [[
      local service, config = require "lbatch.impl.api.service", require "lbatch.impl.api.config"
      local names = {}
      for n in pairs(service.PROVIDERS) do names[#names + 1] = n end
      table.sort(names)
      for _, n in ipairs(names) do
        local cfg, s = config.new({ provider = n })
        io.write(n, "=", cfg and s.key or ("error " .. tostring(type(s) == "table" and s.message or s)), "\n")
      end
    ]])
    local cmd = { "cd", H.q(H.root), "&& env -u DASHSCOPE_API_KEY -u OPENAI_API_KEY -u LBATCH_BASE_URL" }
    for k, v in pairs(vars) do cmd[#cmd + 1] = H.q(k .. "=" .. v) end
    cmd[#cmd + 1] = H.lua .. " " .. H.q(script) .. " 2>&1"
    local out = H.sh(table.concat(cmd, " "))
    H.rm_rf(dir)
    for name in pairs(vars) do
      local p = name:match("^(%u+)_") and name:lower():match("^(%l+)")
      if p and service.PROVIDERS[p] then
        assert.is_truthy(out:find(p .. "=" .. p .. "\n", 1, true), out)
      end
    end
    assert.is_truthy(out:find("zhipu=zhipu", 1, true), out)
    assert.is_truthy(out:find("dashscope=error no API key: pass api_key or set DASHSCOPE_API_KEY;", 1, true), out)
  end)
end)

describe("one shape out", function()
  local together = service.PROVIDERS.together.answers
  local siliconflow = service.PROVIDERS.siliconflow.answers
  local novita = service.PROVIDERS.novita.answers

  it("statuses: lower case on OpenAI's names, the provider's own kept as raw_status", function()
    for raw, want in pairs({ IN_PROGRESS = "in_progress", COMPLETED = "completed", VALIDATING = "validating",
                             CANCELLED = "cancelled" }) do
      local b = http.normalise({ id = "b", status = raw }, together)
      assert.are.equal(want, b.status)
      assert.are.equal(raw, b.raw_status)
    end
    local b = http.normalise({ id = "b", status = "in_queue" }, siliconflow)
    assert.are.same({ "in_progress", "in_queue" }, { b.status, b.raw_status })
    b = http.normalise({ id = "b", status = "PROGRESS" }, novita)
    assert.are.same({ "in_progress", "PROGRESS" }, { b.status, b.raw_status })
    b = http.normalise({ id = "b", status = "completed" }, {})
    assert.are.equal("completed", b.status)
    assert.is_nil(b.raw_status)
  end)

  it("times: integer seconds, ISO-8601 strings read", function()
    local b = http.normalise({ id = "b", created_at = "2024-05-01T12:00:00Z", completed_at = "2024-05-01T12:00:10.5Z",
                               in_progress_at = 1714564801.7, expires_at = "1714564900" }, together)
    assert.are.same({ 1714564800, 1714564810, 1714564801, 1714564900 },
                    { b.created_at, b.completed_at, b.in_progress_at, b.expires_at })
    if math.type then assert.are.equal("integer", math.type(b.completed_at)) end
  end)

  it("\"\" ids are nil (Azure's output_file_id)", function()
    local b = http.normalise({ id = "b", object = "batch", output_file_id = "", error_file_id = "", input_file_id = "f" })
    assert.is_nil(b.output_file_id)
    assert.is_nil(b.error_file_id)
    assert.are.equal("f", b.input_file_id)
  end)

  it("request_counts: filled where the provider gives progress, null fields or nothing", function()
    local b = http.normalise({ id = "b", object = "batch", request_counts = { total = 4 } })
    assert.are.same({ total = 4, completed = 0, failed = 0 }, b.request_counts)
    b = http.normalise({ id = "b", input_file_id = "f", endpoint = "/v1/chat/completions", progress = 50 }, together)
    assert.are.same({ total = 0, completed = 0, failed = 0 }, b.request_counts)
    assert.are.equal(50, b.progress)
    assert.are.equal("batch", b.object)
    b = http.normalise({ id = "b", object = "batch" }, siliconflow)
    assert.are.same({ total = 0, completed = 0, failed = 0 }, b.request_counts)
  end)

  it("wrapped answers unwrapped: Together's create {job, warning}", function()
    local v = assert(http.answer(ok_res('{"job":{"id":"b1","status":"VALIDATING","model_id":"m",'
      .. '"input_file_id":"f","endpoint":"/v1/chat/completions"},"warning":"w"}'), { answers = together }))
    assert.are.equal("b1", v.id)
    assert.are.equal("validating", v.status)
    assert.are.equal("w", v.warning)
    assert.are.equal("m", v.model)
  end)

  it("bare-array lists as pages", function()
    local v = assert(http.answer(ok_res('[{"id":"b1","status":"COMPLETED"},null,{"id":"b2","status":"FAILED"}]'),
      { list = true, answers = together }))
    assert.are.equal("list", v.object)
    assert.is_false(v.has_more)
    assert.are.same({ "b1", "b2" }, { v.data[1].id, v.data[2].id })
    assert.are.same({ "completed", "failed" }, { v.data[1].status, v.data[2].status })
    v = assert(http.answer(ok_res("[]"), { list = true, answers = together }))
    assert.are.same({}, v.data)
  end)

  it("errors in the one error object whatever the envelope", function()
    local _, err = http.answer(ok_res('{"code":20012,"message":"Model does not exist.","data":null}', 400), {})
    assert.are.same({ "http", 400, "20012", "Model does not exist." }, { err.kind, err.status, err.code, err.message })
    _, err = http.answer(ok_res('{"code":20015,"message":"Invalid input file.","data":null}', 200),
      { answers = siliconflow })
    assert.are.same({ "http", "20015", "Invalid input file." }, { err.kind, err.code, err.message })
    _, err = http.answer(ok_res('{"detail":"Not authenticated"}', 401), {})
    assert.are.equal("Not authenticated", err.message)
    _, err = http.answer(ok_res('{"error":"No such batch","code":"not_found"}', 404), {})
    assert.are.same({ "No such batch", "not_found" }, { err.message, err.code })
    _, err = http.answer(ok_res('{"error":{"message":"m","code":"token_limit_exceeded"}}', 400), {})
    assert.are.same({ "m", "token_limit_exceeded" }, { err.message, err.code })
  end)
end)

describe("lbatch validate --provider", function()
  it("refuses a file over each provider's limits, with the limit in the message", function()
    local dir = H.tmpdir()
    local files = {}
    local function file(n, url)
      local key = n .. url
      if files[key] then return files[key] end
      local path = ("%s/f%d%s.jsonl"):format(dir, n, url:gsub("/", "_"))
      local f = assert(io.open(path, "w"))
      local line = '{"custom_id":"r%d","method":"POST","url":"' .. url
        .. '","body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}\n'
      for i = 1, n do f:write(line:format(i)) end
      f:close()
      files[key] = path
      return path
    end
    for name, p in pairs(service.PROVIDERS) do
      local prof = service.PROFILES[p.limits]
      local path = file(prof.max_lines + 1, prof.chat_url or "/v1/chat/completions")
      local out = H.sh(("cd %s && %s bin/lbatch validate --provider %s %s 2>&1; echo rc=$?"):format(
        H.q(H.root), H.lua, name, H.q(path)))
      assert.is_truthy(out:find(("too_many_tasks The file has more than %d requests."):format(prof.max_lines), 1, true),
        name .. ": " .. out:sub(1, 300))
      assert.is_truthy(out:find("(" .. prof.name .. ")", 1, true), out)
      assert.is_truthy(out:find("rc=1", 1, true), out)
    end
    local bom = H.write(dir .. "/bom.jsonl", '\239\187\191{"custom_id":"a","method":"POST","url":"/chat/completions",'
      .. '"body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}\n')
    local out = H.sh(("cd %s && %s bin/lbatch validate --provider azure %s 2>&1"):format(H.q(H.root), H.lua, H.q(bom)))
    assert.is_truthy(out:find("utf8_bom", 1, true), out)
    local zhipu = file(2, "/v1/chat/completions")
    out = H.sh(("cd %s && %s bin/lbatch validate --provider zhipu %s 2>&1"):format(H.q(H.root), H.lua, H.q(zhipu)))
    assert.is_truthy(out:find("url_not_found", 1, true), out)
    H.rm_rf(dir)
  end)
end)
