/* Lua 5.1 to 5.4 (and LuaJIT) from one source: the few calls that moved. */
#ifndef LBATCH_COMPAT_H
#define LBATCH_COMPAT_H

#include <lua.h>
#include <lauxlib.h>

#if LUA_VERSION_NUM < 502
#define lua_rawlen(L, i) lua_objlen(L, (i))
/* LuaJIT 2.1 has these 5.2 functions; plain 5.1 does not */
#if !defined(luaL_newlib)
#define luaL_newlib(L, l) (lua_newtable(L), luaL_register(L, NULL, (l)))
static inline void luaL_setfuncs(lua_State *L, const luaL_Reg *l, int nup) {
  (void)nup; /* no upvalues are used here */
  for (; l->name; l++) {
    lua_pushcfunction(L, l->func);
    lua_setfield(L, -2, l->name);
  }
}
#endif
#endif

#endif
