/* A Lua module for the specs under AddressSanitizer (spec/helper.lua):
 * loading it removes LD_PRELOAD from the process's environment. The
 * sanitizer's runtime is preloaded into busted (spec/run-all, make asan);
 * every command a spec starts would inherit it, and a shell or curl that
 * loads it pays the runtime's start (about 30 ms of CPU here) for nothing.
 * The Lua programs that need it get it back by name (spec/helper.lua,
 * H.lua). Built by the Makefile beside the sanitized core; not part of
 * lbatch. */
#include <stdlib.h>
#include <lua.h>

__attribute__((visibility("default"))) int luaopen_lbatch_spec_unpreload(lua_State *L);
int luaopen_lbatch_spec_unpreload(lua_State *L) {
  lua_pushboolean(L, unsetenv("LD_PRELOAD") == 0);
  return 1;
}
