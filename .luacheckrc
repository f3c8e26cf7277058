-- luacheck (Debian lua-check): `make lint`, and part of `make test`.
std = "max"                   -- Lua 5.1 to 5.4 and LuaJIT
max_line_length = 120
codes = true
include_files = { "**/*.lua", "bin/lbatch", "spec/mutate/run", ".luacheckrc" }
exclude_files = { "emulator/conformance/node_modules", "build", "docs" }

files["spec"] = { std = "+busted", max_line_length = 180 }
files["emulator/lua"] = { globals = { "ngx" } }
files["lbatch/openresty.lua"] = { read_globals = { "ngx" } }
files["examples/openresty"] = { globals = { "ngx" } }
files["spec/fixtures"] = { read_globals = { "ngx" } }
files["bin/lbatch"] = { globals = { "_" } }   -- the shell part: _=[[ ... ]]
files["spec/hostile"] = { globals = { "ngx" } }
