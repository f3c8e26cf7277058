rockspec_format = "3.0"
package = "lbatch"
version = "0.2.0-1"
source = {
  url = "git+https://github.com/lbatch/lbatch.git",
  tag = "v0.2.0",
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
    ["lbatch.version"] = "lbatch/version.lua",
    ["lbatch.service"] = "lbatch/service.lua",
    ["lbatch.errors"] = "lbatch/errors.lua",
    ["lbatch.config"] = "lbatch/config.lua",
    ["lbatch.http"] = "lbatch/http.lua",
    ["lbatch.loop"] = "lbatch/loop.lua",
    ["lbatch.scheduler"] = "lbatch/scheduler.lua",
    ["lbatch.recover"] = "lbatch/recover.lua",
    ["lbatch.quota"] = "lbatch/quota.lua",
    ["lbatch.client"] = "lbatch/client.lua",
    ["lbatch.journal"] = "lbatch/journal.lua",
    ["lbatch.lock"] = "lbatch/lock.lua",
    ["lbatch.watch"] = "lbatch/watch.lua",
    ["lbatch.rules"] = "lbatch/rules.lua",
    ["lbatch.json"] = "lbatch/json.lua",
    ["lbatch.jsonl"] = "lbatch/jsonl.lua",
    ["lbatch.estimate"] = "lbatch/estimate.lua",
    ["lbatch.media"] = "lbatch/media.lua",
    ["lbatch.cost"] = "lbatch/cost.lua",
    ["lbatch.size"] = "lbatch/size.lua",
    ["lbatch.results"] = "lbatch/results.lua",
    ["lbatch.csv"] = "lbatch/csv.lua",
    ["lbatch.pipeline"] = "lbatch/pipeline.lua",
    ["lbatch.flow"] = "lbatch/flow.lua",
    ["lbatch.cli"] = "lbatch/cli.lua",
    ["lbatch.openresty"] = "lbatch/openresty.lua",
    ["lbatch.notify"] = "lbatch/notify.lua",
    ["lbatch.top"] = "lbatch/top.lua",
    ["lbatch.report"] = "lbatch/report.lua",
    ["lbatch.lua_http"] = "lbatch/lua_http.lua",
    ["lbatch.core"] = {
      sources = { "lbatch/core/core.c", "lbatch/core/multi.c", "lbatch/core/xfer.c", "lbatch/core/fail.c",
                  "lbatch/core/idmap.c", "lbatch/core/index.c", "lbatch/core/scan.c", "lbatch/core/sys.c",
                  "lbatch/core/buf.c", "lbatch/core/hmac.c", "lbatch/core/enc.c", "lbatch/core/rec.c" },
      defines = { "_GNU_SOURCE" },
      incdirs = { "$(CURL_INCDIR)" },
      libdirs = { "$(CURL_LIBDIR)" },
      libraries = { "curl", "crypto" },
    },
  },
}
