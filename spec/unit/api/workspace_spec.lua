-- DashScope's workspace domains (help.aliyun.com/en/model-studio/
-- batch-interfaces-compatible-with-openai: https://{WorkspaceId}.ap-southeast-1.maas.aliyuncs.com;
-- Beijing's https://{WorkspaceId}.cn-beijing.maas.aliyuncs.com) as `workspace = ID` with its region: the base URL it makes, and every way an ID could
-- send the key to another host, refused. Pure: nothing is sent.
local config = require "lbatch.impl.api.config"
local service = require "lbatch.impl.api.service"

describe("workspace = ID (DashScope)", function()
  it("makes the workspace's base URL, region intl, DashScope's dialect and limits", function()
    local cfg = assert(config.new({ api_key = "k", workspace = "ws-1a2B3c", region = "intl" }))
    assert.are.same({ "https://ws-1a2b3c.ap-southeast-1.maas.aliyuncs.com/compatible-mode/v1", "intl", "dashscope",
                      "dashscope" }, { cfg.base_url, cfg.region, cfg.provider, cfg.limits })
    assert.are.equal("dashscope", service.DIALECT[cfg.region])
    cfg = assert(config.new({ api_key = "k", workspace = "llm-x", region = "intl", provider = "dashscope" }))
    assert.are.equal("https://llm-x.ap-southeast-1.maas.aliyuncs.com/compatible-mode/v1", cfg.base_url)
    cfg = assert(config.new({ api_key = "k", workspace = "llm-x", region = "cn" }))
    assert.are.same({ "https://llm-x.cn-beijing.maas.aliyuncs.com/compatible-mode/v1", "cn" }, { cfg.base_url, cfg.region })
  end)

  it("refuses an ID that is not one DNS label: the key could reach another host", function()
    for _, id in ipairs({ "evil.example", "a/b", "x@evil.example", "ws:443", "ws?x=", "ws#", "-ws", "ws-", "",
                          "w s", ("a"):rep(64), "ws%2e", "[::1]" }) do
      local cfg, err = config.new({ api_key = "k", workspace = id, region = "intl" })
      assert.is_nil(cfg, id)
      assert.matches("workspace", tostring(err), 1, true)
    end
  end)

  it("refuses what would make the host a guess: another region, another provider, a base URL as well", function()
    local cases = {
      { { region = false }, "workspace needs region: cn" },
      { { region = "openai" }, "workspace is DashScope's, not openai's" },
      { { provider = "groq" }, "workspace is DashScope's, not groq's" },
      { { base_url = "https://dashscope-intl.aliyuncs.com/compatible-mode/v1" }, "workspace and base_url both name a host" },
    }
    for _, c in ipairs(cases) do
      local opts = { api_key = "k", workspace = "ws-1", region = "intl" }
      for k, v in pairs(c[1]) do opts[k] = v or nil end
      local cfg, err = config.new(opts)
      assert.is_nil(cfg)
      assert.matches(c[2], tostring(err), 1, true)
    end
  end)
end)
