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
  int i;
  for (; l->name; l++) {   /* each function gets the nup values under the table as upvalues */
    for (i = 0; i < nup; i++) lua_pushvalue(L, -nup);
    lua_pushcclosure(L, l->func, nup);
    lua_setfield(L, -(nup + 2), l->name);
  }
  lua_pop(L, nup);
}
#endif
#endif

#endif
