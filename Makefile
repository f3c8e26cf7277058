# lbatch: make demo | make test | make check | make build | make emulator | make asan | make install | make docs | make mutate | make soak
#
# Flags (override on the command line):
#   LUA_INCDIR   Lua 5.4 headers          (default /usr/include/lua5.4)
#   JIT_INCDIR   LuaJIT 2.1 headers       (default /usr/include/luajit-2.1)
#   CURL_CFLAGS  libcurl compile flags    (default from pkg-config, else none)
#   CURL_LIBS    libcurl link flags       (default from pkg-config, else -lcurl)
#   CFLAGS       optimisation/debug flags (default -O2 -g)
#   PREFIX       the LuaRocks tree `make install` installs into (default /usr/local:
#                the lbatch command lands in PREFIX/bin)
#   LUA_VERSION  the Lua LuaRocks builds for in `make install` (default 5.4; Debian's
#                LuaRocks would pick 5.1)
#   SPEC         busted arguments (default: spec)
#   FILES        the files `make mutate` mutates (default: lbatch/*.lua and lbatch/core/*.c)
#   SINCE        a commit: `make mutate` mutates only the lines changed since it

LUA_INCDIR ?= /usr/include/lua5.4
JIT_INCDIR ?= /usr/include/luajit-2.1
CURL_CFLAGS ?= $(shell pkg-config --cflags libcurl 2>/dev/null)
CURL_LIBS ?= $(shell pkg-config --libs libcurl 2>/dev/null || echo -lcurl) $(shell pkg-config --libs libcrypto 2>/dev/null || echo -lcrypto)
CFLAGS ?= -O2 -g
PREFIX ?= /usr/local
LUA_VERSION ?= 5.4
SPEC ?= spec
WARN = -std=c99 -D_GNU_SOURCE -Wall -Wextra -Wno-unused-parameter -fvisibility=hidden
SRC = $(addprefix lbatch/core/,core.c multi.c xfer.c fail.c idmap.c index.c scan.c sys.c buf.c hmac.c enc.c rec.c fetch.c)
HDR = lbatch/core/core.h lbatch/core/compat.h lbatch/core/scan.h

# what `make demo` needs: the build, nginx for the emulator, curl
DEB_DEMO = lua5.4 liblua5.4-dev lua-cjson libcurl4-openssl-dev libssl-dev nginx-light libnginx-mod-http-lua \
      luajit2 libluajit2-5.1-dev curl gcc make pkg-config
DEB = lua5.4 lua5.1 lua5.3 liblua5.4-dev liblua5.1-0-dev liblua5.2-dev liblua5.3-dev lua-cjson libcurl4-openssl-dev libssl-dev lua-busted luarocks \
      nginx-light libnginx-mod-http-lua luajit2 libluajit2-5.1-dev lua-luv lua-cqueues lua-http lua-socket lua-filesystem lua-check \
      lua-ldoc lua-markdown clang libclang-rt-14-dev squid openssl util-linux \
      curl gcc make pkg-config time tmux chromium
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)
NODE_DIR = emulator/conformance

BUSTED = env LUA_PATH="./?.lua;./?/init.lua;./spec/?.lua;;" LBATCH_ROOT=$(CURDIR)

ROCKSPEC = $(wildcard rockspec/lbatch-*.rockspec)

.PHONY: all build compat deps demo test test-5.4 test-jit asan conformance emulator bench bench-compare bench-scale bench-join install lint docs fuzz mutate soak clean

all: build

build: build/5.4/lbatch/core.so build/jit/lbatch/core.so

build/5.4/lbatch/core.so: $(SRC) $(HDR)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared -I$(LUA_INCDIR) $(CURL_CFLAGS) -o $@ $(SRC) $(CURL_LIBS)

build/jit/lbatch/core.so: $(SRC) $(HDR)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(WARN) -fPIC -shared -I$(JIT_INCDIR) $(CURL_CFLAGS) -o $@ $(SRC) $(CURL_LIBS)

# The core builds for Lua 5.1, 5.2 and 5.3 too (compile and link check),
# into COMPAT_OUT/VERSION/lbatch/core.so (a spec builds 5.1's in a temp dir).
COMPAT ?= 5.1 5.2 5.3
COMPAT_OUT ?= build
compat: $(SRC) $(HDR)
	@for v in $(COMPAT); do \
	  mkdir -p $(COMPAT_OUT)/$$v/lbatch && \
	  $(CC) $(CFLAGS) $(WARN) -Werror -fPIC -shared -I/usr/include/lua$$v $(CURL_CFLAGS) \
	    -o $(COMPAT_OUT)/$$v/lbatch/core.so $(SRC) $(CURL_LIBS) && echo "lbatch.core builds for Lua $$v" || exit 1; \
	done

build/asan/lbatch/core.so: $(SRC) $(HDR)
	@mkdir -p $(@D)
	$(CC) -O1 -g -fsanitize=address -fno-omit-frame-pointer $(WARN) -fPIC -shared \
	  -I$(LUA_INCDIR) $(CURL_CFLAGS) -o $@ $(SRC) $(CURL_LIBS)

# (for the specs only: spec/tools/unpreload.c)
build/asan/lbatch_spec_unpreload.so: spec/tools/unpreload.c
	@mkdir -p $(@D)
	$(CC) -O1 $(WARN) -fPIC -shared -I$(LUA_INCDIR) -o $@ $<

# Install the Debian packages that are missing (and nothing when none is).
deps:
	@missing=$$(for p in $(or $(PACKAGES),$(DEB)); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(NODE_DIR)/node_modules/.installed: $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm install --no-audit --no-fund --loglevel=error
	@touch $@

RUN54 = env LUA_PATH="./?.lua;./?/init.lua;;" LUA_CPATH="./build/5.4/?.so;;"

# The quickstart and the evaluation workflow on the emulator; on the real
# service (with the free batch-test-model) when DASHSCOPE_API_KEY is set
# and LBATCH_BASE_URL is not.
demo:
	@$(MAKE) -s deps PACKAGES="$(DEB_DEMO)"
	@$(MAKE) -s build
	@if [ -n "$${DASHSCOPE_API_KEY:-}" ] && [ -z "$${LBATCH_BASE_URL:-}" ]; then \
	  $(RUN54) lua5.4 examples/quickstart.lua && \
	  $(RUN54) LBATCH_MODEL=batch-test-model lua5.4 examples/evaluate.lua; \
	else \
	  emulator/around sh -c '$(RUN54) lua5.4 examples/quickstart.lua && echo && \
	    $(RUN54) lua5.4 examples/evaluate.lua'; \
	fi

# (the builds side by side: -j4; npm's install is a job of spec/run-all)
test: deps
	@$(MAKE) -s -j4 build build/asan/lbatch/core.so build/asan/lbatch_spec_unpreload.so
	@spec/run-all

# The inner loop, a couple of minutes (spec/tools/check): the core with
# warnings as errors, luacheck, the pure unit specs on Lua 5.4 and the specs
# of what changed since origin/main. Ends with "N passed, N failed".
.PHONY: check
check: deps
	@spec/tools/check

build/werror/lbatch/core.so: $(SRC) $(HDR)
	@mkdir -p $(@D)
	$(CC) $(CFLAGS) $(WARN) -Werror -fPIC -shared -I$(LUA_INCDIR) $(CURL_CFLAGS) -o $@ $(SRC) $(CURL_LIBS)

test-5.4: deps build
	$(BUSTED) LUA_CPATH="./build/5.4/?.so;;" LBATCH_LUA=lua5.4 lua5.4 /usr/bin/busted $(SPEC)

test-jit: deps build
	$(BUSTED) LUA_CPATH="./build/jit/?.so;;" LBATCH_LUA=luajit luajit /usr/bin/busted --exclude-tags=conformance $(SPEC)

asan: deps build/asan/lbatch/core.so build/asan/lbatch_spec_unpreload.so
	@LBATCH_STAGES='^AddressSanitizer \(Lua 5\.4\)$$' LBATCH_SPECS="$(or $(SPEC),spec/unit/api/client_spec.lua \
	  spec/unit/core/jsonl_encoder_spec.lua spec/unit/public/results_light_spec.lua spec/unit/public/results_join_spec.lua)" spec/run-all

conformance: deps $(NODE_DIR)/node_modules/.installed
	$(BUSTED) lua5.4 /usr/bin/busted spec/conformance/conformance_spec.lua spec/conformance/providers_sdk_spec.lua

emulator: deps
	emulator/run $(ARGS)

# lbatch beside the openai SDK and curl (JOBS, LINES, SIZE_MB, POLL, LUA)
# (then the same over HTTPS and HTTP/2, the SDK trusting the CA through NODE_EXTRA_CA_CERTS)
bench-compare: deps build $(NODE_DIR)/node_modules/.installed
	EMULATOR_ARGS="--speed 2000 --dialect openai --rate-limits off" emulator/around bench/compare
	EMULATOR_ARGS="--speed 2000 --dialect openai --rate-limits off" emulator/around --tls bench/compare

# lbatch at the service's scale: merge, pipeline, a quota, 200 jobs told and polled, 1,000 jobs (SIZES, BENCH_10M=1)
bench-scale: deps build
	bench/scale

# lbatch's join beside DuckDB's on the same files (N="100000 1000000"): wall, peak RSS (PHASES=1: lbatch's phases)
bench/duckdb/node_modules/.installed: bench/duckdb/package.json
	cd bench/duckdb && npm install --no-audit --no-fund --loglevel=error
	@touch $@

bench-join: deps build bench/duckdb/node_modules/.installed
	N="$(N)" PHASES="$(PHASES)" bench/join

bench: deps build
	$(RUN54) lua5.4 bench/jsonl.lua
	env LUA_PATH="./?.lua;./?/init.lua;;" LUA_CPATH="./build/jit/?.so;;" luajit bench/jsonl.lua

# (luarocks make compiles in the checkout: its objects are removed after)
# --deps-mode=none: lua-cjson is the system's (Debian's lua-cjson), which LuaRocks
# does not see and so calls missing; that note is replaced by a check that the
# Lua it built for loads cjson (a warning, with the fix, when it does not)
install: build
	@log=$$(mktemp); luarocks --lua-version $(LUA_VERSION) --tree $(PREFIX) make --deps-mode=none $(ROCKSPEC) \
	  >"$$log" 2>&1; rc=$$?; rm -f lbatch/core.so lbatch/core/*.o; \
	  sed -e '/^Missing dependencies for lbatch /d' -e '/^ *lua-cjson (not installed)$$/d' "$$log"; rm -f "$$log"; \
	  [ $$rc = 0 ] || exit $$rc; \
	  lua=$$(luarocks --lua-version $(LUA_VERSION) config variables.LUA 2>/dev/null); \
	  if "$${lua:-lua$(LUA_VERSION)}" -e 'require "cjson"' 2>/dev/null; then \
	    echo "lua-cjson: the system's, outside LuaRocks (as --deps-mode=none expects)"; \
	  else echo "warning: Lua $(LUA_VERSION) finds no lua-cjson: apt-get install lua-cjson," \
	    "or luarocks --lua-version $(LUA_VERSION) --tree $(PREFIX) install lua-cjson" >&2; fi

lint: deps
	luacheck -q .

# The fuzzers over the core's byte scanners and its encoder, FUZZ_SECONDS each (default 600)
fuzz: deps
	spec/fuzz/run $(or $(FUZZ_SECONDS),600)

# Mutation testing (spec/mutate/run): small bugs, each in a temp copy of the
# tree, two at a time, each against the specs that load its module (quickest
# first, up to the first that kills it), the survivors against the whole
# Lua 5.4 suite; prints the score. SINCE=REF mutates only the lines changed
# since REF (git diff, uncommitted changes included): minutes. The whole run
# is long: not part of make test.
mutate: deps build
	MUTATE_SINCE="$(SINCE)" spec/mutate/run $(FILES)

# The kill -9 soak (spec/soak/run.lua): hundreds of random kills of the
# pipeline and the flow on a slow server, restarted at once or after a
# pause; prints its figures. Long: not part of make test (SOAK_* bound it).
soak: deps build
	$(BUSTED) LUA_CPATH="./build/5.4/?.so;;" LBATCH_LUA=lua5.4 lua5.4 spec/soak/run.lua

# The API reference of the public modules from their doc comments (LDoc,
# config.ld): docs/api/index.html, or DOCS_DIR/index.html
DOCS_DIR ?= docs/api
docs: deps
	@rm -rf "$(DOCS_DIR)/modules" "$(DOCS_DIR)/classes"   # (LDoc leaves the pages of a module no longer documented)
	@out=$$(ldoc -q -d "$(DOCS_DIR)" . 2>&1) || { echo "$$out"; exit 1; }; \
	  echo "$$out" | grep -v -e '^reading configuration from' -e '^found master module' || true; \
	  echo "API reference: $(DOCS_DIR)/index.html"

clean:
	rm -rf build docs/api lbatch/core.so lbatch/core/*.o
