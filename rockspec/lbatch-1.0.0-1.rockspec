rockspec_format = "3.0"
package = "lbatch"
version = "1.0.0-1"
source = {
  url = "git+https://github.com/lbatch/lbatch.git",
  tag = "v1.0.0",
}
description = {
  summary = "Batch File API client (DashScope, OpenAI) on libcurl's multi interface",
  detailed = [[
A C core on one libcurl multi handle and a thin Lua layer: upload request
files streamed from disk, create, wait for and cancel batches, download
results streamed to disk, with many jobs at once from coroutines or from a
host loop that calls step(). Lua 5.2 to 5.4 and LuaJIT 2.1; on plain Lua
5.1 only the modules that make no client (lbatch.csv, lbatch.jsonl,
lbatch.rules, ...): lbatch.new and the command refuse it.]],
  license = "MIT",
  homepage = "https://github.com/lbatch/lbatch",
}
dependencies = {
  "lua >= 5.1",   -- LuaJIT counts as 5.1; plain 5.1 runs the pure modules only (lbatch.loop.UNSUPPORTED)
  "lua-cjson",
}
external_dependencies = {
  -- the library only: Debian keeps curl.h in the multiarch include dir,
  -- which the compiler searches but LuaRocks' header probe does not
  CURL = { library = "curl" },
  CRYPTO = { library = "crypto" },   -- OpenSSL's libcrypto: HMAC-SHA256 for webhooks
}
build = {
  type = "builtin",
  install = { bin = { lbatch = "bin/lbatch" } },
  modules = {
    ["lbatch"] = "lbatch/init.lua",
    ["lbatch.impl.transport.version"] = "lbatch/impl/transport/version.lua",
    ["lbatch.impl.api.service"] = "lbatch/impl/api/service.lua",
    ["lbatch.impl.transport.errors"] = "lbatch/impl/transport/errors.lua",
    ["lbatch.impl.api.config"] = "lbatch/impl/api/config.lua",
    ["lbatch.impl.transport.http"] = "lbatch/impl/transport/http.lua",
    ["lbatch.impl.transport.loop"] = "lbatch/impl/transport/loop.lua",
    ["lbatch.impl.transport.scheduler"] = "lbatch/impl/transport/scheduler.lua",
    ["lbatch.impl.api.recover"] = "lbatch/impl/api/recover.lua",
    ["lbatch.impl.orchestration.quota"] = "lbatch/impl/orchestration/quota.lua",
    ["lbatch.impl.api.client"] = "lbatch/impl/api/client.lua",
    ["lbatch.impl.orchestration.journal"] = "lbatch/impl/orchestration/journal.lua",
    ["lbatch.impl.orchestration.lock"] = "lbatch/impl/orchestration/lock.lua",
    ["lbatch.impl.orchestration.batchchat"] = "lbatch/impl/orchestration/batchchat.lua",
    ["lbatch.impl.api.watch"] = "lbatch/impl/api/watch.lua",
    ["lbatch.impl.formats.rules"] = "lbatch/impl/formats/rules.lua",
    ["lbatch.json"] = "lbatch/json.lua",
    ["lbatch.jsonl"] = "lbatch/jsonl.lua",
    ["lbatch.impl.formats.estimate"] = "lbatch/impl/formats/estimate.lua",
    ["lbatch.impl.formats.media"] = "lbatch/impl/formats/media.lua",
    ["lbatch.impl.formats.cost"] = "lbatch/impl/formats/cost.lua",
    ["lbatch.impl.formats.size"] = "lbatch/impl/formats/size.lua",
    ["lbatch.impl.formats.shape"] = "lbatch/impl/formats/shape.lua",
    ["lbatch.results"] = "lbatch/results.lua",
    ["lbatch.csv"] = "lbatch/csv.lua",
    ["lbatch.pipeline"] = "lbatch/pipeline.lua",
    ["lbatch.flow"] = "lbatch/flow.lua",
    ["lbatch.cmd.cli"] = "lbatch/cmd/cli.lua",
    ["lbatch.openresty"] = "lbatch/openresty.lua",
    ["lbatch.notify"] = "lbatch/notify.lua",
    ["lbatch.cmd.top"] = "lbatch/cmd/top.lua",
    ["lbatch.cmd.report"] = "lbatch/cmd/report.lua",
    ["lbatch.lua_http"] = "lbatch/lua_http.lua",
    ["lbatch.config"] = "lbatch/config.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.cost"] = "lbatch/cost.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.estimate"] = "lbatch/estimate.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.http"] = "lbatch/http.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.journal"] = "lbatch/journal.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.media"] = "lbatch/media.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.quota"] = "lbatch/quota.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.recover"] = "lbatch/recover.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.report"] = "lbatch/report.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.rules"] = "lbatch/rules.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.scheduler"] = "lbatch/scheduler.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.service"] = "lbatch/service.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.top"] = "lbatch/top.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.watch"] = "lbatch/watch.lua",   -- deprecated forwarder, removed at 2.0
    ["lbatch.core"] = {
      sources = { "lbatch/core/core.c", "lbatch/core/multi.c", "lbatch/core/xfer.c", "lbatch/core/fail.c",
                  "lbatch/core/idmap.c", "lbatch/core/index.c", "lbatch/core/scan.c", "lbatch/core/sys.c",
                  "lbatch/core/buf.c", "lbatch/core/hmac.c", "lbatch/core/enc.c", "lbatch/core/rec.c",
                  "lbatch/core/fetch.c" },
      defines = { "_GNU_SOURCE" },
      incdirs = { "$(CURL_INCDIR)" },
      libdirs = { "$(CURL_LIBDIR)" },
      libraries = { "curl", "crypto" },
    },
  },
}
